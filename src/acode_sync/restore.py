"""`acode db restore`: rebuild run state from PostgreSQL into a workspace database.

PostgreSQL is read in one read-only REPEATABLE READ transaction (one moment for every
table), table by table through server-side cursors, a chunk at a time; the workspace is
written in one SQLite transaction, so a restore that stops halfway (an error, kill -9)
leaves the workspace as it was. The restore holds the workspace's sync lock: no syncer
ships the workspace meanwhile, and a restore refuses a workspace a syncer holds.

Restored rows get no outbox record: they are already in PostgreSQL. A local row at the
same or a newer version is kept (skipped, with the reason), and so is a row whose parent
the workspace lacks. Each restored row is read back and proven: the jsonb text of the
payload it makes (its columns and its unknown keys) must hash to the `canonical_digest`
PostgreSQL recorded when it applied that version (docs/cli.md#acode-db-restore).

As of a time (`--as-of`), each entity's newest version at or before it is restored: the
current row if it is that old, else the newest the version history holds
(acode.entity_history, [postgres] keep_history), proved the same way. A time older than
the history is refused; an entity that existed then but whose version then PostgreSQL
no longer holds is reported, not restored.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.to_thread
import asyncpg

from acode_sync.config import PostgresSettings
from acode_sync.domain import format_timestamp, parse_timestamp
from acode_sync.errors import (
    AcodeError,
    BusyError,
    PostgresSchemaMismatchError,
    RecordRejectedError,
    SchemaMismatchError,
)
from acode_sync.history import HISTORY_MIGRATION, horizon, refuse_before_horizon
from acode_sync.jsonb import jsonb_text, loads, quoted, sorted_keys
from acode_sync.migrations import AppliedMigration, load_migrations, plan_migrations
from acode_sync.pg_tables import TABLES, Kind, TableSpec
from acode_sync.postgres import PostgresTarget
from acode_sync.sql import queries
from acode_sync.sync import SyncLock
from acode_sync.workspace import database_path, open_workspace, origin_id, translated

CHUNK_ROWS: Final = 5000
MAX_SKIPPED_SHOWN: Final = 20
_PG = queries("postgres")
_SQLITE = queries("sqlite")

# Parents before children, so that a child's parent is already written when it is checked.
RESTORE_ORDER: Final = ("Session", "SessionTask", "Step", "ToolCall", "SessionEvent", "Artifact")
# The workspace's foreign keys: column -> (parent table, parent id column). A row whose
# parent the workspace lacks (PostgreSQL has no foreign keys) is skipped, not written.
PARENTS: Final[Mapping[str, Mapping[str, tuple[str, str]]]] = {
    "sessions": {},
    "session_tasks": {"session_id": ("sessions", "session_id")},
    "steps": {"task_id": ("session_tasks", "task_id"), "session_id": ("sessions", "session_id")},
    "tool_calls": {"step_id": ("steps", "step_id"), "session_id": ("sessions", "session_id")},
    "session_events": {"session_id": ("sessions", "session_id")},
    "artifacts": {"session_id": ("sessions", "session_id")},
}
# Which rows a restore reads: $1 the session ids, or $1 the origin.
_WHERE: Final = {
    "all": "true",
    "sessions": "session_id = ANY($1::text[])",
    "origin": "origin_id = $1::text",
}
# As of a time, bound as $1: the selection's arguments come after it.
_WHERE_AS_OF: Final = {
    "all": "true",
    "sessions": "session_id = ANY($2::text[])",
    "origin": "origin_id = $2::text",
}
# The columns every entity table of this schema version needs (migration 0004).
_REQUIRED_PG_VERSION: Final = 4


def parse_as_of(text: str) -> str:
    """An RFC 3339 time (any offset) as the canonical text of a version."""
    try:
        return format_timestamp(parse_timestamp(text))
    except RecordRejectedError as error:
        raise RecordRejectedError(
            f"--as-of: {error.message}",
            hint="Give an RFC 3339 time with its offset, such as 2026-01-15T10:30:00Z or "
            "2026-01-15T11:30:00.250+01:00. Nothing was written.",
        ) from None


@dataclass(frozen=True, slots=True)
class Selection:
    """What to restore: some sessions, one origin's rows, or (neither given) everything;
    as of a time (canonical text, see parse_as_of), or (None) the latest versions."""

    session_ids: tuple[str, ...] = ()
    origin: str | None = None
    as_of: str | None = None

    @property
    def kind(self) -> str:
        return "sessions" if self.session_ids else "origin" if self.origin else "all"

    def arguments(self) -> tuple[Any, ...]:
        first = () if self.as_of is None else (parse_timestamp(self.as_of),)
        if self.session_ids:
            return (*first, list(self.session_ids))
        return first if self.origin is None else (*first, self.origin)


def _pg_selected(spec: TableSpec, column_name: str) -> str:
    kind = next(c.kind for c in spec.columns if c.name == column_name)
    if kind is Kind.TIMESTAMP:
        utc = f"{column_name} AT TIME ZONE 'UTC'"
        return f"""to_char({utc}, 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS {column_name}"""
    if kind is Kind.JSONB:
        return f"{column_name}::text AS {column_name}"
    return column_name


@dataclass(frozen=True)
class _TableStatements:
    spec: TableSpec
    columns: tuple[str, ...]  # the workspace row: the entity's columns, then extra
    json_columns: frozenset[str]
    select: Mapping[str, str]  # PostgreSQL, by selection kind
    select_as_of: Mapping[str, str]  # the same, as of a time
    unknown_as_of: Mapping[str, str]
    local_versions: str
    write: str
    read_back: str


def _statements(spec: TableSpec) -> _TableStatements:
    names = tuple(c.name for c in spec.columns)
    columns = (*names, "extra")
    selected = ", ".join(
        [
            *(_pg_selected(spec, n) for n in names),
            "CASE WHEN extra = '{}' THEN NULL ELSE extra::text END AS extra",
        ]
    )

    def local(name: str, **more: str) -> str:
        sql = _SQLITE[name].replace("<t>", spec.table).replace("<id_column>", spec.id_column)
        for marker, value in more.items():
            sql = sql.replace(f"<{marker}>", value)
        return sql

    listed = ", ".join(columns)
    return _TableStatements(
        spec=spec,
        columns=columns,
        json_columns=frozenset(c.name for c in spec.columns if c.kind is Kind.JSONB) | {"extra"},
        select={
            kind: _PG["restore_entities"]
            .replace("<selected>", selected)
            .replace("<t>", spec.table)
            .replace("<where>", where)
            for kind, where in _WHERE.items()
        },
        select_as_of={
            kind: _PG["restore_entities_as_of"]
            .replace("<selected>", selected)
            .replace("<from_payload>", spec.row_from_payload())
            .replace("<entity_type>", spec.entity_type)
            .replace("<id_column>", spec.id_column)
            .replace("<t>", spec.table)
            .replace("<where>", where)
            for kind, where in _WHERE_AS_OF.items()
        },
        unknown_as_of={
            kind: _PG["restore_unknown_as_of"]
            .replace("<entity_type>", spec.entity_type)
            .replace("<id_column>", spec.id_column)
            .replace("<t>", spec.table)
            .replace("<where>", where)
            for kind, where in _WHERE_AS_OF.items()
        },
        local_versions=local("restore_local_versions"),
        write=local(
            "restore_entity",
            columns=listed,
            placeholders=", ".join("?" for _ in columns),
            updates=", ".join(f"{c} = excluded.{c}" for c in columns if c != spec.id_column),
        ),
        read_back=local("restore_read_back", columns=listed),
    )


STATEMENTS: Final[Mapping[str, _TableStatements]] = {
    entity_type: _statements(TABLES[entity_type]) for entity_type in RESTORE_ORDER
}
_PRESENT_IDS: Final = {
    (table, id_column): _SQLITE["restore_present_ids"]
    .replace("<t>", table)
    .replace("<id_column>", id_column)
    for parents in PARENTS.values()
    for table, id_column in parents.values()
}


@cache
def _layout(
    columns: tuple[str, ...], json_columns: frozenset[str]
) -> tuple[tuple[int, str, bool], ...]:
    """A row's payload keys in jsonb order: (column index, key as JSON, holds JSON text)."""
    keys = sorted_keys(c for c in columns if c != "extra")
    return tuple((columns.index(k), quoted(k), k in json_columns) for k in keys)


def canonical_digest(
    columns: tuple[str, ...], row: Sequence[Any], json_columns: frozenset[str]
) -> bytes:
    """The digest PostgreSQL records for the payload this workspace row makes: its
    columns, and the unknown keys it keeps in `extra`."""
    extra = row[columns.index("extra")]
    if extra is None:  # the columns alone, in an order known in advance
        items = (
            f"{key}: {jsonb_text(loads(row[at]) if is_json and row[at] is not None else row[at])}"
            for at, key, is_json in _layout(columns, json_columns)
        )
        text = "{" + ", ".join(items) + "}"
    else:
        payload = {
            name: loads(value) if name in json_columns and value is not None else value
            for name, value in zip(columns, row, strict=True)
            if name != "extra"
        }
        text = jsonb_text(payload | loads(extra))
    return hashlib.sha256(text.encode()).digest()


@dataclass(slots=True)
class TableCounts:
    read: int = 0
    restored: int = 0
    verified: int = 0
    not_reproducible: int = 0  # restored, but the row does not rebuild the recorded digest
    no_digest: int = 0  # restored; PostgreSQL recorded none (applied before migration 0004)
    skipped_newer: int = 0
    skipped_same: int = 0
    skipped_differs: int = 0  # the same version locally, with other content: kept
    skipped_orphan: int = 0
    # As of a time: existed then, but PostgreSQL no longer holds its version then.
    unknown_as_of: int = 0

    @property
    def skipped(self) -> int:
        return self.skipped_newer + self.skipped_same + self.skipped_differs + self.skipped_orphan


@dataclass
class RestoreReport:
    workspace: Path
    origin_id: str
    as_of: str | None = None
    tables: dict[str, TableCounts] = field(
        default_factory=lambda: {STATEMENTS[t].spec.table: TableCounts() for t in RESTORE_ORDER}
    )
    skipped_examples: list[str] = field(default_factory=list)
    unknown_examples: list[str] = field(default_factory=list)

    def total(self, name: str) -> int:
        return sum(int(getattr(counts, name)) for counts in self.tables.values())

    def skip(self, counts: TableCounts, reason: str, example: str) -> None:
        setattr(counts, reason, getattr(counts, reason) + 1)
        if len(self.skipped_examples) < MAX_SKIPPED_SHOWN:
            self.skipped_examples.append(example)

    def as_dict(self) -> dict[str, Any]:
        return {
            "workspace": str(self.workspace),
            "origin_id": self.origin_id,
            "as_of": self.as_of,
            "tables": {
                name: {f: getattr(c, f) for f in TableCounts.__slots__} | {"skipped": c.skipped}
                for name, c in self.tables.items()
            },
            "skipped_examples": self.skipped_examples,
            "unknown_examples": self.unknown_examples,
        }

    def lines(self) -> list[str]:
        when = "" if self.as_of is None else f" as of {self.as_of}"
        lines = [f"restored into {self.workspace}{when} (its origin: {self.origin_id})"]
        for name, c in self.tables.items():
            lines.append(
                f"{name:<15} restored {c.restored:>8}  verified {c.verified:>8}  "
                f"not reproducible {c.not_reproducible:>6}  no digest {c.no_digest:>6}  "
                f"skipped {c.skipped:>6}"
            )
        lines.append(
            f"total: {self.total('restored')} restored, {self.total('verified')} verified, "
            f"{self.total('skipped')} skipped"
        )
        if self.total("skipped"):
            lines.append(
                f"skipped: {self.total('skipped_newer')} with a newer local version, "
                f"{self.total('skipped_same')} already at that version locally, "
                f"{self.total('skipped_differs')} at that version locally with other content, "
                f"{self.total('skipped_orphan')} whose parent the workspace lacks"
            )
            lines.extend(f"  {example}" for example in self.skipped_examples)
        if self.total("unknown_as_of"):
            lines.append(
                f"not restored: {self.total('unknown_as_of')} that existed at {self.as_of} "
                "but whose version then PostgreSQL no longer holds (the version history "
                "began later, or its retention dropped it)"
            )
            lines.extend(f"  {example}" for example in self.unknown_examples)
        return lines


Progress = Callable[[int], None]


class _WorkspaceWriter:
    """The SQLite side: one transaction for the whole restore; runs in worker threads,
    one call at a time."""

    def __init__(self, workspace: Path) -> None:
        self.path = database_path(workspace)
        self.lock = SyncLock(workspace)
        self.conn = open_workspace(workspace)
        try:
            self.origin_id = translated(self.path, origin_id, self.conn)
            if not translated(self.path, self.lock.try_acquire):
                raise BusyError(
                    f"{workspace}: a syncer (acode-syncd or acode db sync) holds the sync lock",
                    hint="Stop the daemon for this workspace (or wait for `acode db sync` to "
                    "finish), then run the restore again. Nothing was written.",
                )
            translated(self.path, self.conn.execute, "BEGIN IMMEDIATE")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")
        self.conn.close()
        self.lock.release()

    def commit(self) -> None:
        translated(self.path, self.conn.execute, "COMMIT")

    def write_chunk(
        self, entity_type: str, rows: Sequence[asyncpg.Record], report: RestoreReport
    ) -> None:
        translated(self.path, self._write_chunk, STATEMENTS[entity_type], rows, report)

    def _ids_present(self, table: str, id_column: str, ids: set[str]) -> set[str]:
        sql = _PRESENT_IDS[table, id_column]
        return {row[0] for row in self.conn.execute(sql, (json.dumps(sorted(ids)),))}

    def _differing(self, st: _TableStatements, central: Mapping[str, asyncpg.Record]) -> set[str]:
        """The ids whose local row, at the central version, holds other content: both rows
        hashed the same way, so spellings of equal JSON do not count as a difference."""
        if not central:
            return set()
        return {
            local[0]
            for local in self.conn.execute(st.read_back, (json.dumps(list(central)),))
            if canonical_digest(st.columns, local, st.json_columns)
            != canonical_digest(st.columns, tuple(central[local[0]])[:-1], st.json_columns)
        }

    def _write_chunk(
        self, st: _TableStatements, rows: Sequence[asyncpg.Record], report: RestoreReport
    ) -> None:
        spec = st.spec
        counts = report.tables[spec.table]
        counts.read += len(rows)
        rows_by_id = {row[spec.id_column]: row for row in rows}
        local = dict(self.conn.execute(st.local_versions, (json.dumps(list(rows_by_id)),)))
        present = {
            column: self._ids_present(parent, parent_id, {r[column] for r in rows} - {None})
            for column, (parent, parent_id) in PARENTS[spec.table].items()
        }
        tied = [i for i, row in rows_by_id.items() if local.get(i) == row["updated_at"]]
        differs = self._differing(st, {i: rows_by_id[i] for i in tied})
        chosen: dict[str, asyncpg.Record] = {}
        for entity_id, row in rows_by_id.items():
            skipped = _skip_reason(row, local.get(entity_id), present, entity_id in differs)
            if skipped is None:
                chosen[entity_id] = row
            else:
                reason, why = skipped
                report.skip(counts, reason, f"{spec.entity_type} {entity_id}: {why}")
        if not chosen:
            return
        self.conn.executemany(st.write, (tuple(row)[:-1] for row in chosen.values()))
        counts.restored += len(chosen)
        for written in self.conn.execute(st.read_back, (json.dumps(list(chosen)),)):
            recorded = chosen[written[0]]["canonical_digest"]
            if recorded is None:
                counts.no_digest += 1
            elif canonical_digest(st.columns, written, st.json_columns) == recorded:
                counts.verified += 1
            else:
                counts.not_reproducible += 1


def _skip_reason(
    row: asyncpg.Record,
    local_version: str | None,
    present: Mapping[str, set[str]],
    differs: bool,
) -> tuple[str, str] | None:
    """Why a row read from PostgreSQL is not written (None: it is)."""
    version = row["updated_at"]
    if local_version is not None and local_version > version:
        return "skipped_newer", f"the local version {local_version} is newer than {version}"
    if local_version == version and differs:
        return (
            "skipped_differs",
            f"at version {version} locally too, but with other content than PostgreSQL's "
            "(the local row is kept)",
        )
    if local_version == version:
        return "skipped_same", f"already at version {version} locally"
    for column, ids in present.items():
        if row[column] is not None and row[column] not in ids:
            return "skipped_orphan", f"its {column} {row[column]} is not in the workspace"
    return None


async def _check_schema(conn: asyncpg.Connection, selection: Selection) -> None:
    if not await conn.fetchval(_PG["schema_exists"]):
        raise PostgresSchemaMismatchError(
            "PostgreSQL has no acode schema: there is nothing to restore from",
            hint="Check that [postgres] or ACODE_POSTGRES_URL names the central database the "
            "daemons ship to. Nothing was written.",
        )
    rows = await conn.fetch(_PG["applied_migrations"])
    applied = [AppliedMigration(r["version"], r["checksum"]) for r in rows]
    try:
        pending = plan_migrations(applied, load_migrations("postgres"))
    except SchemaMismatchError as error:
        raise PostgresSchemaMismatchError(f"PostgreSQL: {error.message}") from None
    required = _REQUIRED_PG_VERSION if selection.as_of is None else HISTORY_MIGRATION
    if any(m.version <= required for m in pending):
        what = "a restore" if selection.as_of is None else "a restore as of a time"
        raise PostgresSchemaMismatchError(
            f"the PostgreSQL schema is at version {max((a.version for a in applied), default=0)}; "
            f"{what} needs version {required} or later",
            hint="Run `acode db migrate --postgres`, then restore again. Nothing was written.",
        )


async def _check_selection(conn: asyncpg.Connection, selection: Selection) -> None:
    if selection.as_of is not None:
        refuse_before_horizon(
            selection.as_of, parse_timestamp(selection.as_of), await horizon(conn)
        )
    if selection.session_ids:
        missing = await conn.fetchval(_PG["restore_missing_sessions"], list(selection.session_ids))
        if missing:
            raise RecordRejectedError(
                f"no session {', '.join(sorted(missing))} in PostgreSQL",
                hint="Check the session ids (`acode db status` on the machine that wrote them). "
                "Nothing was written.",
            )
    elif selection.origin is not None and not await conn.fetchval(
        _PG["restore_origin_exists"], selection.origin
    ):
        raise RecordRejectedError(
            f"PostgreSQL holds no entity written by origin {selection.origin}",
            hint="An origin is the origin_id of the workspace that wrote the rows. "
            "Nothing was written.",
        )


@dataclass(frozen=True)
class RestoreRequest:
    workspace: Path
    selection: Selection
    chunk_rows: int = CHUNK_ROWS


async def restore(
    settings: PostgresSettings, request: RestoreRequest, *, progress: Progress | None = None
) -> RestoreReport:
    """Restore `request.selection` from PostgreSQL into `request.workspace`."""
    target = PostgresTarget(settings)
    try:
        conn = await asyncpg.connect(
            dsn=settings.connect_dsn(),
            password=settings.resolved_password(),
            timeout=settings.connect_timeout,
            server_settings={"application_name": "acode-restore"},
            # 0 behind a transaction-pooling PgBouncer (docs/postgres.md): a named
            # statement would meet another client's of the same name on its server
            # connection (the cursors' are dropped first: queries.sql restore_opening).
            statement_cache_size=settings.statement_cache_size,
        )
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as error:
        raise target.outage(error, "connecting for a restore") from None
    try:
        return await _restore(conn, request, progress)
    except AcodeError:
        raise
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as error:
        raise target.outage(error, "reading for a restore") from None
    finally:
        with anyio.move_on_after(settings.connect_timeout, shield=True):
            await conn.close()


async def _restore(
    conn: asyncpg.Connection, request: RestoreRequest, progress: Progress | None
) -> RestoreReport:
    selection = request.selection
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        await conn.execute(_PG["restore_opening"])
        await _check_schema(conn, selection)
        await _check_selection(conn, selection)
        writer = await anyio.to_thread.run_sync(_WorkspaceWriter, request.workspace)
        try:
            report = RestoreReport(request.workspace, writer.origin_id, selection.as_of)
            done = 0
            for entity_type in RESTORE_ORDER:
                st = STATEMENTS[entity_type]
                if selection.as_of is not None:
                    await _report_unknown(conn, st, selection, report)
                select = (st.select if selection.as_of is None else st.select_as_of)[selection.kind]
                cursor = await conn.cursor(select, *selection.arguments())
                rows = await cursor.fetch(request.chunk_rows)
                while rows:
                    # The next chunk is read from PostgreSQL while this one is written.
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(
                            anyio.to_thread.run_sync, writer.write_chunk, entity_type, rows, report
                        )
                        next_rows = await cursor.fetch(request.chunk_rows)
                    done += len(rows)
                    if progress is not None:
                        progress(done)
                    rows = next_rows
            await anyio.to_thread.run_sync(writer.commit)
        finally:
            await anyio.to_thread.run_sync(writer.close)
    return report


async def _report_unknown(
    conn: asyncpg.Connection, st: _TableStatements, selection: Selection, report: RestoreReport
) -> None:
    counts = report.tables[st.spec.table]
    sql = st.unknown_as_of[selection.kind]
    async for row in conn.cursor(sql, *selection.arguments()):
        counts.unknown_as_of += 1
        if len(report.unknown_examples) < MAX_SKIPPED_SHOWN:
            report.unknown_examples.append(
                f"{st.spec.entity_type} {row[0]}: its version at {selection.as_of} is not in the "
                "history"
            )
