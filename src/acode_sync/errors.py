"""Every error the product raises on purpose: one class per ACODE-DB code.

Each class carries its code, a default message (its docstring) and a hint that tells
the operator the way out. Messages never include a secret: callers pass only paths,
identifiers and error class names, never a DSN or a password.
"""

from __future__ import annotations

from typing import ClassVar

EX_SOFTWARE = 1
EX_CONFIG = 78


class AcodeError(Exception):
    """acode-sync failed."""

    code: ClassVar[str] = "ACODE-DB-000"
    default_hint: ClassVar[str] = "See docs/errors.md."
    exit_code: ClassVar[int] = EX_SOFTWARE

    def __init__(self, message: str | None = None, *, hint: str | None = None) -> None:
        self.message = message or (self.__doc__ or "").strip()
        self.hint = hint or self.default_hint
        super().__init__(f"{self.code}: {self.message}")


class WorkspaceOpenError(AcodeError):
    """The workspace database cannot be opened or created."""

    code = "ACODE-DB-001"
    default_hint = (
        "Check that the path is a workspace you own, that .agent/workspace.db is a SQLite "
        "database, and that the disk is writable and not full."
    )


class MigrationError(AcodeError):
    """A schema migration failed and was rolled back."""

    code = "ACODE-DB-002"
    default_hint = (
        "The database is unchanged. Fix the cause named above, then run `acode db migrate`."
    )


class SchemaMismatchError(AcodeError):
    """The database schema does not match this program."""

    code = "ACODE-DB-003"
    default_hint = (
        "Upgrade acode-sync to a version that knows this schema; never edit an applied migration."
    )


class WorkspaceNotCreatedError(SchemaMismatchError):
    """A workspace database with no schema yet: its agent may be creating it right now
    (a new database file exists before the transaction that creates its schema commits)."""

    default_hint = (
        "The agent creates the schema when it first opens the workspace. A file that stays "
        "without one is not a workspace: open it with the agent, or remove it."
    )


class PostgresMigrationError(MigrationError):
    """A PostgreSQL schema migration failed and was rolled back."""

    default_hint = (
        "Nothing was applied; the daemon waits as if PostgreSQL were down. Fix the cause, "
        "then run `acode db migrate --postgres`."
    )


class BusyError(AcodeError):
    """Waiting for the workspace database lock timed out."""

    code = "ACODE-DB-004"
    default_hint = (
        "Another process held the write lock longer than the busy timeout. Retry, or find "
        "the process that keeps the database locked."
    )


class PostgresUnavailableError(AcodeError):
    """PostgreSQL is unreachable, refused the connection, or failed the TLS handshake."""

    code = "ACODE-DB-005"
    default_hint = (
        "Check that PostgreSQL is running and reachable, and the [postgres] settings or "
        "ACODE_POSTGRES_URL. Records wait in the outbox meanwhile; nothing is lost."
    )

    def __init__(
        self, message: str | None = None, *, hint: str | None = None, suspect: bool = False
    ) -> None:
        super().__init__(message, hint=hint)
        # The failure may follow the batch rather than the server (a statement timeout):
        # the syncer may isolate the batch's records to find out (docs/sync.md).
        self.suspect = suspect


class PostgresRefusedError(PostgresUnavailableError):
    """PostgreSQL answers but refuses the work: its state or the role's, not a record's."""

    default_hint = (
        "The server or the role refuses writes (read-only, a missing privilege, a full disk, "
        "a lock, too many connections: see the SQLSTATE). Records wait in the outbox and "
        "ship once it is fixed; no record's attempts are used."
    )

    def __init__(self, message: str, *, sqlstate: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class PostgresSchemaMismatchError(SchemaMismatchError):
    """The PostgreSQL schema does not match this program."""

    default_hint = (
        "Records wait in the outboxes. Upgrade acode-sync, or migrate the PostgreSQL schema "
        "with `acode db migrate --postgres`."
    )


class RecordRejectedError(AcodeError):
    """A record was rejected: invalid entity, payload, argument or state transition."""

    code = "ACODE-DB-006"
    default_hint = (
        "Correct the input. A rejected outbox record can be replayed with `acode db outbox retry`."
    )


class InvalidTransitionError(RecordRejectedError):
    """The session state machine refuses this transition."""


class ConfigError(AcodeError):
    """The configuration is invalid."""

    code = "ACODE-DB-007"
    default_hint = (
        "Correct the key named above; configuration.md (in docs/, or /usr/share/doc/acode-sync/) "
        "gives every key's type and default."
    )
    exit_code = EX_CONFIG


ALL_ERRORS: tuple[type[AcodeError], ...] = (
    WorkspaceOpenError,
    MigrationError,
    SchemaMismatchError,
    BusyError,
    PostgresUnavailableError,
    RecordRejectedError,
    ConfigError,
)
