"""The central PostgreSQL: pool lifecycle, schema migrations, batch apply, error classes.

Errors are classified by SQLSTATE, never by message text (the table is in docs/sync.md):
- a record's own fault (22 data, 23 integrity, 54 program limit; client-side encoding):
  RecordFailure, so the caller can isolate the record and charge it;
- a fault that may follow the batch or the server (57014 a statement timeout, a client
  timeout, an error raised by a trigger or routine, an internal error): a
  PostgresUnavailableError with `suspect` set: the caller may isolate the batch's
  records, and charges one only if the failure follows that record sent alone;
- anything else is the server's or the role's state (08 connection, 25 read-only,
  28 authentication, 40 rollback, 42 privileges or schema, 53 resources, 55 locks,
  57 operator, 58 system ...): PostgresRefusedError (the server answered) or
  PostgresUnavailableError, an outage that waits and never uses up a record's attempts.
The password is given to asyncpg apart from the DSN, and no error text built here
contains the DSN: only the host description, error class names, SQLSTATEs and the
server's own message for a refusal (which never holds the password).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import Enum
from itertools import accumulate
from pathlib import Path
from typing import Any, Final, NamedTuple

import anyio
import asyncpg

from acode_sync import retention
from acode_sync.config import PostgresSettings
from acode_sync.errors import (
    AcodeError,
    PostgresMigrationError,
    PostgresRefusedError,
    PostgresSchemaMismatchError,
    PostgresUnavailableError,
    SchemaMismatchError,
)
from acode_sync.migrations import (
    AppliedMigration,
    Migration,
    latest_version,
    load_migrations,
    plan_migrations,
)
from acode_sync.pg_tables import (
    APPLY_ROUND_WITH_HISTORY_SQL,
    ENTITY_TYPES,
    NO_CANONICAL_DIGEST,
    TABLES,
    round_sql,
)
from acode_sync.sql import queries

DIALECT: Final = "postgres"
LOCK_NAMESPACE: Final = 0x61636F64  # "acod": our advisory locks never meet another app's
MIGRATION_LOCK: Final = 1
RECORD_SQLSTATE_CLASSES: Final = frozenset({"22", "23", "54"})
# Raised by a trigger, a routine or the server's own code: they may follow the data.
SUSPECT_SQLSTATE_CLASSES: Final = frozenset({"09", "21", "27", "2F", "38", "39", "P0", "XX"})
QUERY_CANCELED: Final = "57014"  # statement_timeout (lock waits end in 55P03 first)
# A serialization failure or a deadlock: the transaction is retried at once, this often.
RETRY_NOW_SQLSTATES: Final = frozenset({"40001", "40P01"})
APPLY_ATTEMPTS: Final = 5
# `acode db migrate --postgres`: a migration that rewrites a large table (7, at 10M keys)
# takes minutes; the operator who asked waits for it. An automatic one gives up after
# four statement timeouts (rolled back; records wait) rather than hold the daemon.
EXPLICIT_MIGRATION_SECONDS: Final = 24 * 3600.0
# While another daemon migrates, the others look again this often.
MIGRATION_POLL_SECONDS: Final = 0.5
# Lock waits give up after this share of the statement timeout, with lock_not_available
# (55P03, the server's state): a table an administrator locked never looks like a slow
# record.
LOCK_TIMEOUT_SHARE: Final = 0.5
SCHEMA_GONE_SQLSTATES: Final = frozenset({"42P01", "3F000", "42703"})
_Q = queries(DIALECT)
# Per entity type: the versions held of a page of entities (`acode db verify`).
VERSIONS_SQL: Final = {
    spec.entity_type: _Q["entity_versions"]
    .replace("<id_column>", spec.id_column)
    .replace("<t>", spec.table)
    for spec in TABLES.values()
}

FaultHook = Callable[[str], None]


class _Connection(asyncpg.Connection):  # type: ignore[misc]
    """Nothing outlives a transaction here (advisory locks and settings are all
    transaction-scoped), so a connection going back to the pool needs no RESET round trip."""

    def get_reset_query(self) -> str:
        return ""


class Fault(Enum):
    RECORD = "record"
    SUSPECT = "suspect"
    SERVER = "server"


class _Raced(Exception):
    """Another transaction changed what this round judged since its snapshot (created an
    entity judged new, replaced a loser's row, recorded its conflict): judge again."""


# A round holds one record per entity: a unique violation of an entity table's primary
# key (session, id), or of its id alone (UNIQUE, migration 6: the entity created under
# another session), can only be another transaction's creation of an entity the round
# judged as new (pg_tables). Any other unique violation is the record's.
ENTITY_KEYS: Final = frozenset(
    (spec.table, constraint)
    for spec in TABLES.values()
    for constraint in (f"{spec.table}_pkey", f"{spec.table}_{spec.id_column}_key")
)


# Citus reports a shard's own names: the table's and the constraint's, each with the
# shard's id appended (sessions_102008, sessions_pkey_102008).
_SHARD_SUFFIX: Final = re.compile(r"_[0-9]+$")


def is_entity_race(error: asyncpg.UniqueViolationError) -> bool:
    if error.schema_name != "acode":
        return False
    table, constraint = str(error.table_name or ""), str(error.constraint_name or "")
    if (table, constraint) in ENTITY_KEYS:
        return True
    shard = _SHARD_SUFFIX.search(table)
    if shard is None or not constraint.endswith(shard.group()):
        return False
    return (table[: shard.start()], constraint[: -len(shard.group())]) in ENTITY_KEYS


class RecordFailure(Exception):
    """PostgreSQL (or the driver) refused the data of a batch: some record in it is bad."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PreparedRecord(NamedTuple):
    """An outbox record checked and normalised for shipping (a tuple: a batch makes a
    thousand of them, and a frozen dataclass costs several times more to build)."""

    outbox_id: int
    idempotency_key: str  # canonical timestamp
    entity_type: str
    entity_id: str
    session_id: str | None
    payload: bytes  # UTF-8
    version: str  # canonical updated_at, from the key
    base_updated_at: str | None
    digest: bytes
    # SHA-256 of the payload's jsonb text (jsonb.payload_digest_as_jsonb); None: the
    # round computes it.
    canonical_digest: bytes | None = None


@dataclass(frozen=True, slots=True)
class Conflict:
    conflict_id: int
    incoming_key: str
    current_key: str
    incoming_updated_at: datetime
    current_updated_at: datetime
    incoming_origin: str
    current_origin: str
    winner: str


CONFLICT_FIELDS: Final = tuple(Conflict.__dataclass_fields__)


def _conflict(row: asyncpg.Record) -> Conflict:
    return Conflict(**{name: row[name] for name in CONFLICT_FIELDS})


@dataclass(slots=True)
class BatchOutcome:
    applied: list[PreparedRecord] = field(default_factory=list)
    duplicates: list[PreparedRecord] = field(default_factory=list)
    conflicted: list[PreparedRecord] = field(default_factory=list)
    conflicts: list[Conflict] = field(default_factory=list)

    @property
    def delivered(self) -> list[PreparedRecord]:
        """Every record PostgreSQL now holds, whatever the outcome."""
        return self.applied + self.duplicates + self.conflicted

    def extend(self, other: BatchOutcome) -> None:
        self.applied += other.applied
        self.duplicates += other.duplicates
        self.conflicted += other.conflicted
        self.conflicts += other.conflicts


STATEMENT_CACHE_LIMIT: Final = max(64 * 1024, 2 * len(APPLY_ROUND_WITH_HISTORY_SQL))


def lock_key(text: str) -> int:
    return int.from_bytes(
        hashlib.blake2b(text.encode(), digest_size=4).digest(), "big", signed=True
    )


def rounds(records: Sequence[PreparedRecord]) -> list[list[PreparedRecord]]:
    """Split records so that each round holds at most one record per entity, in order:
    one INSERT ... ON CONFLICT cannot touch a row twice."""
    result: list[list[PreparedRecord]] = []
    seen: dict[tuple[str, str], int] = {}
    for record in records:
        entity = (record.entity_type, record.entity_id)
        index = seen.get(entity, -1) + 1
        seen[entity] = index
        if index == len(result):
            result.append([])
        result[index].append(record)
    return result


# One table's arguments in the round statement: the records' small fields as one JSON
# array, their payloads as one UTF-8 blob with the offset and length of each, and their
# digests as one blob: per record its payload digest, then its canonical digest or
# NO_CANONICAL_DIGEST, 32 bytes each. (An array parameter per field costs several times
# more: asyncpg checks and copies array elements one by one.)
Columns = tuple[str, bytes, list[int], list[int], bytes]
_NO_RECORDS: Columns = ("[]", b"", [], [], b"")


class RoundPlan(NamedTuple):
    """One round: the columns of each entity type it holds, in ENTITY_TYPES order."""

    columns: dict[str, Columns]

    @property
    def entity_types(self) -> tuple[str, ...]:
        return tuple(self.columns)

    @property
    def arguments(self) -> list[Any]:
        """For pg_tables.round_sql(entity_types): the tables of its records."""
        return [a for columns in self.columns.values() for a in columns]

    def for_every_table(self) -> list[Any]:
        """For the statement for every table: no records for the others."""
        return [a for t in ENTITY_TYPES for a in self.columns.get(t, _NO_RECORDS)]


@dataclass(frozen=True, slots=True)
class BatchPlan:
    """A batch's statement arguments, built before it is applied (in a worker thread,
    while PostgreSQL applies the batch before it)."""

    records: Sequence[PreparedRecord]
    locks: list[int]
    rounds: list[RoundPlan]


_SESSION_KEY: Final = b'"session_id"'
_JSON_SPACE: Final = b" \t\n\r"


def session_is_the_records(payload: bytes, session: str | None) -> bool:
    """Whether a payload's session, as the round reads it (its session_id, else the
    record's), is the record's own, seen without parsing it. For a payload that is valid
    JSON: with no \\u escape, a key session_id is spelled as such; if it is spelled at most
    once, and then with the record's session as its value, the payload names either that
    session or none (the one spelling is a nested key's), and either way the record's
    session is the payload's. Otherwise (False) the round parses the payload's session."""
    if session is None or b"\\u" in payload:
        return False
    found = payload.count(_SESSION_KEY)
    if found == 0:
        return True
    if found > 1 or '"' in session or "\\" in session:
        return False
    rest = payload[payload.index(_SESSION_KEY) + len(_SESSION_KEY) :].lstrip(_JSON_SPACE)
    if rest[:1] != b":":
        return False
    return rest[1:].lstrip(_JSON_SPACE).startswith(b'"' + session.encode() + b'"')


def _columns(records: list[PreparedRecord]) -> Columns:
    records.sort(key=lambda r: r.entity_id)  # a fixed row lock order
    # The key is not sent: it is EntityType:entity_id:version, rebuilt by the statement.
    fields = json.dumps(
        [
            (
                r.entity_id,
                r.session_id,
                r.version,
                r.base_updated_at,
                not session_is_the_records(r.payload, r.session_id),
            )
            for r in records
        ]
    )
    lengths = [len(r.payload) for r in records]
    starts = list(accumulate(lengths[:-1], initial=1))  # substring() counts from 1
    payloads = b"".join(r.payload for r in records)
    digests = b"".join(r.digest + (r.canonical_digest or NO_CANONICAL_DIGEST) for r in records)
    return fields, payloads, starts, lengths, digests


def _apply_rounds(records: Sequence[PreparedRecord]) -> list[RoundPlan]:
    planned = []
    for batch_round in rounds(records):
        by_type: dict[str, list[PreparedRecord]] = {}
        for record in batch_round:
            by_type.setdefault(record.entity_type, []).append(record)
        planned.append(RoundPlan({t: _columns(by_type[t]) for t in ENTITY_TYPES if t in by_type}))
    return planned


def batch_opening(statement_timeout: float, locks: Sequence[int]) -> str:
    """BEGIN, then the batch's settings and session locks, as one simple query (its values
    are numbers: nothing else reaches the text)."""
    timeout_ms = int(statement_timeout * 1000)
    lock_timeout_ms = max(1, int(timeout_ms * LOCK_TIMEOUT_SHARE))
    return (
        _Q["batch_opening"]
        .replace("<statement_timeout>", str(timeout_ms))
        .replace("<lock_timeout>", str(lock_timeout_ms))
        .replace("<namespace>", str(LOCK_NAMESPACE))
        .replace("<locks>", ",".join(str(int(lock)) for lock in locks))
    )


def plan_batch(records: Sequence[PreparedRecord]) -> BatchPlan:
    sessions = {r.session_id or f"{r.entity_type}:{r.entity_id}" for r in records}
    return BatchPlan(
        records=records,
        locks=sorted({lock_key(session) for session in sessions}),
        rounds=_apply_rounds(records),
    )


async def _roll_back(conn: asyncpg.Connection, seconds: float) -> None:
    """End a failed batch's transaction, even when a cancellation (a timeout) ended the
    batch; a connection that cannot (broken, or still busy with the cancelled statement)
    is closed instead, and the server rolls the transaction back."""
    with anyio.CancelScope(shield=True):
        # Not is_in_transaction(): while the opening is in flight (a cancellation during
        # its lock wait) the client has not yet read that BEGIN ran. ROLLBACK waits for
        # the cancelled statement; outside a transaction it is a mere warning.
        try:
            if conn.is_closed():
                return
        except asyncpg.InterfaceError:
            return  # lost: the pool has already taken the connection back
        try:
            with anyio.fail_after(seconds):
                await conn.execute("ROLLBACK")
        except Exception:
            conn.terminate()


def _sqlstate(error: BaseException) -> str:
    return str(getattr(error, "sqlstate", "") or "")


# asyncpg's client-side "cannot encode this value" error; its public name `DataError` is
# taken by the server's SQLSTATE class 22 error.
_CLIENT_DATA_ERROR: type[Exception] = asyncpg.exceptions._base.DataError


def fault_of(error: BaseException) -> Fault:
    """Whose fault an error is: the table in docs/sync.md."""
    if isinstance(error, asyncpg.PostgresError):
        state = _sqlstate(error)
        if state[:2] in RECORD_SQLSTATE_CLASSES:
            return Fault.RECORD
        if state[:2] in SUSPECT_SQLSTATE_CLASSES or state == QUERY_CANCELED:
            return Fault.SUSPECT
        return Fault.SERVER
    if isinstance(error, UnicodeError | _CLIENT_DATA_ERROR):
        return Fault.RECORD
    if isinstance(error, TimeoutError):
        return Fault.SUSPECT
    return Fault.SERVER


def is_record_error(error: BaseException) -> bool:
    return fault_of(error) is Fault.RECORD


async def read_schema_plan(
    conn: asyncpg.Connection, available: Sequence[Migration], *, exists: bool | None = None
) -> tuple[bool, list[AppliedMigration], list[Migration]]:
    """Whether the central schema exists (read here unless given), the migrations
    applied, and those to run. Raises SchemaMismatchError for a schema this program does
    not know (newer, or edited)."""
    if exists is None:
        exists = bool(await conn.fetchval(_Q["schema_exists"]))
    applied = []
    if exists:
        rows = await conn.fetch(_Q["applied_migrations"])
        applied = [AppliedMigration(r["version"], r["checksum"]) for r in rows]
    return exists, applied, list(plan_migrations(applied, available))


def _is_connection_error(error: BaseException) -> bool:
    """The connection itself failed (class 08): unreachable rather than refusing."""
    return _sqlstate(error)[:2] == "08" or isinstance(
        error, OSError | asyncpg.InterfaceError | asyncpg.exceptions.ConnectionDoesNotExistError
    )


def _server_message(error: BaseException) -> str:
    message = getattr(error, "message", None)
    return str(message)[:300] if message else type(error).__name__


TLS_FILE_KEYS: Final = ("sslrootcert", "sslcert", "sslkey", "sslcrl")
TLS_REQUIRED_MODES: Final = frozenset({"require", "verify-ca", "verify-full"})
INVALID_PASSWORD: Final = "28P01"  # noqa: S105 - a SQLSTATE


def _tls_files(settings: PostgresSettings) -> list[tuple[str, Path]]:
    """(key, path) of every TLS file the connection will read."""
    named = dict(settings.parsed_dsn().parameters)
    if settings.sslrootcert is not None:
        named["sslrootcert"] = str(settings.sslrootcert)
    # asyncpg reads this variable when nothing else names a CA file.
    if "sslrootcert" not in named and os.environ.get("PGSSLROOTCERT"):
        named["sslrootcert"] = os.environ["PGSSLROOTCERT"]
    return [(key, Path(named[key]).expanduser()) for key in TLS_FILE_KEYS if key in named]


def _unreadable_tls_file(settings: PostgresSettings) -> str:
    files = _tls_files(settings)
    for key, path in files:
        if not path.is_file() or not os.access(path, os.R_OK):
            reason = "not a readable file" if path.exists() else "no such file"
            return f"{path} ({key}): {reason}"
    return "one of " + (", ".join(str(path) for _, path in files) or "its files")


def connection_advice(error: BaseException, settings: PostgresSettings) -> str | None:
    """What a connection failure means and how to fix it, where the error alone does not
    say (a TLS file, a server without TLS, a missing or rejected password); never quotes
    the password."""
    mode = settings.effective_sslmode() or "prefer"
    if isinstance(error, FileNotFoundError | PermissionError | NotADirectoryError):
        return (
            f"TLS (sslmode={mode}) cannot read {_unreadable_tls_file(settings)}; put the "
            "file there or point postgres.sslrootcert (or the DSN's ssl... parameter) at it"
        )
    if isinstance(error, asyncpg.ClientConfigurationError):
        # asyncpg's own text: it names the file it looked for.
        advice = f"{str(error).splitlines()[0][:300]} (sslmode={mode})"
        if mode in ("verify-ca", "verify-full"):
            advice += (
                "; set postgres.sslrootcert to the CA file that signed the server's certificate"
            )
        return advice
    if type(error) is ConnectionError and mode in TLS_REQUIRED_MODES:
        if "rejected SSL upgrade" in str(error):  # asyncpg's own text: nothing else tells
            return (
                f"the server does not offer TLS, and sslmode={mode} requires it; turn ssl on "
                "in the server (ssl = on, with a certificate), or, only on a link you trust, "
                'set postgres.sslmode = "prefer"'
            )
        return f"the TLS negotiation failed (sslmode={mode}); see the server's log"
    if _sqlstate(error) == INVALID_PASSWORD:
        if settings.password is None and settings.password_file is None:
            return (
                "the server asks for a password and none is configured; set "
                "postgres.password_file (or ACODE_POSTGRES_PASSWORD_FILE)"
            )
        given = (
            f"from postgres.password_file {settings.password_file}"
            if settings.password is None
            else "from postgres.password, the DSN or ACODE_POSTGRES_PASSWORD"
        )
        return f"the server rejected the password ({given}) for the DSN's user; correct it"
    return None


class PostgresTarget:
    """The pool and everything the syncers do against PostgreSQL."""

    def __init__(self, settings: PostgresSettings) -> None:
        self.settings = settings
        self._pool: asyncpg.Pool | None = None
        self._schema_ready = False
        # With the version history on, its retention: the round's last argument.
        self._history_arguments: tuple[timedelta, ...] = ()
        if settings.keep_history:
            self._history_arguments = (timedelta(days=settings.history_retention_days),)

    @property
    def description(self) -> str:
        return self.settings.host_description()

    def outage(self, error: BaseException, doing: str) -> PostgresUnavailableError:
        state = _sqlstate(error)
        where = f"PostgreSQL at {self.description}: {doing}"
        fault = fault_of(error)
        advice = connection_advice(error, self.settings)
        advised = f": {advice}" if advice else ""
        if state and fault is Fault.SERVER and not _is_connection_error(error):
            if state in SCHEMA_GONE_SQLSTATES:
                self._schema_ready = False  # dropped or changed: check it again
            return PostgresRefusedError(
                f"{where}: the server refused: SQLSTATE {state} ({type(error).__name__}): "
                f"{_server_message(error)}{advised}",
                sqlstate=state,
            )
        detail = type(error).__name__ + (f" (SQLSTATE {state})" if state else "")
        return PostgresUnavailableError(
            f"{where}: {detail}{advised}", suspect=fault is Fault.SUSPECT
        )

    @contextmanager
    def _classified(self, doing: str) -> Iterator[None]:
        try:
            yield
        except (AcodeError, RecordFailure, _Raced):
            raise
        except Exception as error:
            if is_record_error(error):
                raise RecordFailure(
                    f"{_sqlstate(error) or 'client'}: {_server_message(error)}"
                ) from None
            raise self.outage(error, doing) from None

    async def _get_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            s = self.settings
            with self._classified("creating the pool"):
                # min_size 0 connects lazily, so creating the pool never fails on an outage.
                self._pool = await asyncpg.create_pool(
                    dsn=s.connect_dsn(),
                    password=s.resolved_password(),
                    min_size=s.pool_min,
                    max_size=s.pool_max,
                    max_inactive_connection_lifetime=s.idle_timeout,
                    timeout=s.connect_timeout,
                    command_timeout=s.statement_timeout + s.connect_timeout,
                    server_settings={"application_name": "acode-syncd"},
                    connection_class=_Connection,
                    statement_cache_size=s.statement_cache_size,
                    # The round statement is larger than asyncpg caches by default (15 KiB):
                    # prepared again for every round, it would be planned every time.
                    max_cacheable_statement_size=STATEMENT_CACHE_LIMIT,
                )
        return self._pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            with anyio.move_on_after(self.settings.connect_timeout, shield=True):
                await pool.close()
                return
            pool.terminate()

    @property
    def connections_in_use(self) -> int:
        if self._pool is None:
            return 0
        return int(self._pool.get_size()) - int(self._pool.get_idle_size())

    async def probe(self) -> bool:
        try:
            with anyio.fail_after(self.settings.connect_timeout), self._classified("probe"):
                pool = await self._get_pool()
                await pool.fetchval(_Q["probe"])
        except (PostgresUnavailableError, TimeoutError):
            return False
        return True

    async def ensure_schema(
        self, available: Sequence[Migration] | None = None, *, explicit: bool = False
    ) -> tuple[int, int]:
        """Bring the schema to this program's version under an advisory lock (many daemons
        share one server). With auto_migrate off, an older schema is reported instead,
        unless the migration was asked for explicitly (`acode db migrate --postgres`)."""
        available = load_migrations(DIALECT) if available is None else available
        pool = await self._get_pool()
        limit = EXPLICIT_MIGRATION_SECONDS if explicit else self.settings.statement_timeout * 4
        pending: Sequence[Migration] = ()
        with self._classified("migrating"), anyio.move_on_after(limit) as deadline:
            async with pool.acquire() as conn:
                facts = await conn.fetchrow(_Q["schema_facts"])
                encoding = facts["encoding"]
                if encoding != "UTF8":
                    raise PostgresSchemaMismatchError(
                        f"the PostgreSQL database's encoding is {encoding}; acode-sync needs "
                        "UTF8 (records' text would be refused)",
                        hint="Create the central database with ENCODING 'UTF8' (for example "
                        "`createdb -E UTF8 -T template0 acode`), then point the DSN at it.",
                    )
                # Read first, without the lock: a fleet starting at once on a current schema
                # goes on at once instead of queueing on the lock one transaction at a time.
                _, applied, pending = await self._plan(
                    conn, available, exists=facts["schema_exists"]
                )
                while pending:
                    # In a transaction of its own: one that had already read the catalog
                    # would not see a migration committed meanwhile.
                    async with conn.transaction():
                        if await conn.fetchval(
                            _Q["try_migration_lock"], LOCK_NAMESPACE, MIGRATION_LOCK
                        ):
                            exists, applied, pending = await self._plan(conn, available)
                            await self._migrate(
                                conn, exists, applied, pending, explicit=explicit, limit=limit
                            )
                            break
                    # Another daemon is migrating: look again once it may have finished.
                    await anyio.sleep(random.uniform(0.5, 1) * MIGRATION_POLL_SECONDS)  # noqa: S311
                    _, applied, pending = await self._plan(conn, available)
        if deadline.cancelled_caught:
            if pending and not explicit:  # the migration's time (or the lock's), not the server's
                raise PostgresUnavailableError(
                    f"PostgreSQL at {self.description}: the schema's migration did not finish "
                    f"within {limit:g} s (four postgres.statement_timeout) and was rolled back "
                    "(or another migration held the migration lock that long)",
                    hint="Run `acode db migrate --postgres` as the schema's owner: it waits as "
                    "long as the migration takes. Records wait in the outbox meanwhile; "
                    "nothing is lost.",
                )
            raise self.outage(TimeoutError(), "migrating")
        current = max((m.version for m in applied), default=0)
        self._schema_ready = True
        return current, latest_version(available)

    async def _migrate(
        self,
        conn: asyncpg.Connection,
        exists: bool,
        applied: Sequence[AppliedMigration],
        pending: Sequence[Migration],
        *,
        explicit: bool,
        limit: float,
    ) -> None:
        """Run what is pending, under the migration lock (the caller's transaction), each
        migration within `limit` seconds."""
        if not pending:
            return  # another daemon migrated while this one waited for the lock
        current = max((m.version for m in applied), default=0)
        if not (self.settings.auto_migrate or explicit):
            raise PostgresSchemaMismatchError(
                f"the PostgreSQL schema is at version {current}, this program needs "
                f"{pending[-1].version}, and postgres.auto_migrate is off",
                hint="Run `acode db migrate --postgres` or turn auto_migrate on.",
            )
        await self._check_may_migrate(conn, current, pending[-1].version)
        if not exists:
            await conn.execute(_Q["create_schema"])
            await conn.execute(_Q["create_migrations_table"])
        await conn.execute(_Q["set_migration_search_path"])
        for migration in pending:
            await self._run_migration(conn, migration, limit)

    @staticmethod
    async def _plan(
        conn: asyncpg.Connection, available: Sequence[Migration], *, exists: bool | None = None
    ) -> tuple[bool, list[AppliedMigration], list[Migration]]:
        try:
            return await read_schema_plan(conn, available, exists=exists)
        except SchemaMismatchError as error:
            raise PostgresSchemaMismatchError(f"PostgreSQL: {error.message}") from None

    @staticmethod
    async def _check_may_migrate(conn: asyncpg.Connection, current: int, needed: int) -> None:
        """Only the schema's owner migrates: a syncer role is told so, before any DDL (it
        would fail on a permission error), and waits as in an outage."""
        facts = await conn.fetchrow(_Q["may_migrate"])
        if not facts["may_migrate"]:
            raise PostgresSchemaMismatchError(
                f"the PostgreSQL schema is at version {current}, this program needs {needed}, "
                f"and role {facts['role']} may not migrate it (only the owner of the schema "
                "acode migrates)",
                hint="Run `acode db migrate --postgres` as the schema's owner (then `acode db "
                "grant ROLE` for the syncer roles). Records wait in the outboxes meanwhile.",
            )

    @asynccontextmanager
    async def administering(self, doing: str) -> AsyncIterator[asyncpg.Connection]:
        """One connection in one transaction for an administrator's command (`acode db
        grant`, `acode db tenants`), its errors classified as everywhere else."""
        pool = await self._get_pool()
        with self._classified(doing), anyio.fail_after(self.settings.statement_timeout * 4):
            async with pool.acquire() as conn, conn.transaction():
                yield conn

    async def _run_migration(
        self, conn: asyncpg.Connection, migration: Migration, limit: float
    ) -> None:
        try:
            async with conn.transaction():  # a savepoint: its failure is reported by name
                await conn.execute(migration.sql, timeout=limit)
                await conn.execute(
                    _Q["record_migration"], migration.version, migration.name, migration.checksum
                )
        except asyncpg.PostgresError as error:
            raise PostgresMigrationError(
                f"PostgreSQL migration {migration.version} ({migration.name}) failed: "
                f"SQLSTATE {_sqlstate(error)}: {getattr(error, 'message', type(error).__name__)}"
            ) from None

    async def apply(
        self, origin_id: str, plan: BatchPlan, *, fault_hook: FaultHook | None = None
    ) -> BatchOutcome:
        """Apply one batch in one transaction, round after round. A transaction that lost a
        race (a serialization failure, a deadlock, an entity another transaction wrote
        meanwhile) is rolled back and run again at once."""
        if not self._schema_ready:
            await self.ensure_schema()
        attempt = 1  # of APPLY_ATTEMPTS
        while True:
            try:
                return await self._apply_once(origin_id, plan, fault_hook)
            except (_Raced, PostgresUnavailableError) as error:
                retry_now = isinstance(error, _Raced) or (
                    isinstance(error, PostgresRefusedError)
                    and error.sqlstate in RETRY_NOW_SQLSTATES
                )
                if not retry_now and self._pool is not None:
                    # The next batch connects anew: after a failover or a change to the
                    # role, a pooled connection would keep the old server or settings.
                    await self._pool.expire_connections()
                if not retry_now or attempt == APPLY_ATTEMPTS:
                    if isinstance(error, _Raced):
                        raise PostgresUnavailableError(
                            f"PostgreSQL at {self.description}: a batch kept meeting "
                            f"concurrent writes of its entities ({APPLY_ATTEMPTS} attempts)"
                        ) from None
                    raise
                await anyio.sleep(random.uniform(0, 0.01 * attempt))  # noqa: S311 - jitter
                attempt += 1

    async def _apply_once(
        self, origin_id: str, plan: BatchPlan, fault_hook: FaultHook | None
    ) -> BatchOutcome:
        pool = await self._get_pool()
        timeout = self.settings.statement_timeout + self.settings.connect_timeout
        with self._classified("applying a batch"), anyio.fail_after(timeout * 2):
            async with pool.acquire() as conn:
                try:
                    outcome = await self._apply_in_transaction(conn, origin_id, plan)
                    if fault_hook is not None:
                        fault_hook("before_commit")
                    await conn.execute("COMMIT")
                except BaseException:
                    await _roll_back(conn, self.settings.connect_timeout)
                    raise
                if fault_hook is not None:
                    fault_hook("after_commit")
        return outcome

    async def _apply_in_transaction(
        self, conn: asyncpg.Connection, origin_id: str, plan: BatchPlan
    ) -> BatchOutcome:
        # BEGIN, the settings and the locks: one exchange (asyncpg's conn.transaction()
        # would send BEGIN alone), ended by the caller's COMMIT or _roll_back.
        await conn.execute(batch_opening(self.settings.statement_timeout, plan.locks))
        outcome = BatchOutcome()
        by_key = {r.idempotency_key: r for r in plan.records}
        for planned in plan.rounds:
            rows = await self._round(conn, origin_id, planned)
            self._collect(rows, by_key, outcome)
        if not (outcome.duplicates or outcome.conflicts):
            outcome.applied = list(plan.records)
            return outcome
        duplicates = {r.idempotency_key for r in outcome.duplicates}
        conflicted = {c.incoming_key for c in outcome.conflicts}
        for record in plan.records:
            if record.idempotency_key in conflicted:
                outcome.conflicted.append(record)
            elif record.idempotency_key not in duplicates:
                outcome.applied.append(record)
        return outcome

    async def _round(
        self, conn: asyncpg.Connection, origin_id: str, planned: RoundPlan
    ) -> list[asyncpg.Record]:
        """One round statement; an entity another transaction wrote meanwhile rolls the
        batch back (_Raced): a new one it created, or a losing record's row it changed."""
        history = bool(self._history_arguments)
        if self.settings.statement_cache_size > 0:
            # Prepared once per connection: one statement for every table (each variant
            # prepared would hold its plans, megabytes, in every backend).
            sql = round_sql(ENTITY_TYPES, history=history)
            arguments = planned.for_every_table()
        else:  # parsed and planned for every round: only its tables
            sql = round_sql(planned.entity_types, history=history)
            arguments = planned.arguments
        try:
            rows = list(await conn.fetch(sql, origin_id, *arguments, *self._history_arguments))
        except asyncpg.UniqueViolationError as error:
            if is_entity_race(error):
                raise _Raced(error.table_name) from None
            raise
        if any(row["outcome"] == "raced" for row in rows):
            raise _Raced("a row changed since the round's snapshot")
        return rows

    @staticmethod
    def _collect(
        rows: Sequence[asyncpg.Record], by_key: dict[str, PreparedRecord], outcome: BatchOutcome
    ) -> None:
        """A round's conflicts and duplicates."""
        for row in rows:
            kind = row["outcome"]
            if kind == "conflict":
                outcome.conflicts.append(_conflict(row))
            elif kind == "duplicate":
                outcome.duplicates.append(by_key[row["incoming_key"]])

    async def list_conflicts(self, session_id: str | None, limit: int) -> list[dict[str, Any]]:
        pool = await self._get_pool()
        with self._classified("listing"), anyio.fail_after(self.settings.statement_timeout):
            if not self._schema_ready:
                await self.ensure_schema()
            rows = await pool.fetch(_Q["list_conflicts"], session_id, limit)
        return [dict(row) for row in rows]

    async def entity_versions(
        self, entity_type: str, entity_ids: Sequence[str]
    ) -> list[asyncpg.Record]:
        """The version PostgreSQL holds of each of these entities that it has: entity_id,
        updated_at, origin_id, idempotency_key, payload_digest."""
        pool = await self._get_pool()
        with (
            self._classified("reading versions"),
            anyio.fail_after(self.settings.statement_timeout),
        ):
            if not self._schema_ready:
                await self.ensure_schema()
            return list(await pool.fetch(VERSIONS_SQL[entity_type], list(entity_ids)))

    async def prune_applied_keys(self, before: datetime) -> int:
        """Forget the applied keys of versions before `before`, by whole partitions (a
        partition straddling it is kept), and keep today's and the next days' partitions;
        returns the keys forgotten."""
        return await self.prune(retention.APPLIED_KEYS, before)

    async def prune(self, spec: retention.PartitionedTable, before: datetime | None) -> int:
        """Drop `spec`'s partitions wholly before `before`, then create those of today and
        the days ahead (see acode_sync/retention.py); returns the rows forgotten. It is
        DDL: a role that does not own the tables is refused (42501, logged by the daemon;
        the schema's owner runs `acode db prune`)."""
        pool = await self._get_pool()
        with (
            self._classified("pruning"),
            anyio.fail_after(self.settings.statement_timeout * 4),
        ):
            if not self._schema_ready:
                await self.ensure_schema()
            async with pool.acquire() as conn:
                return await retention.prune(conn, spec, before, datetime.now(UTC))
