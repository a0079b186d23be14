"""How each entity's payload maps onto its typed PostgreSQL table.

The round statement (round_sql, for a set of entity types; APPLY_ROUND_SQL for every
table) is assembled from the blocks of sql/postgres/queries.sql (`incoming_entities`,
`apply_entities` and `round_outcome`, filled per table from these constant specs), once
per set of types (cached): no input ever reaches it. With
`history` it also appends the versions it writes to the version history
(`append_history`, [postgres] keep_history; APPLY_ROUND_WITH_HISTORY_SQL).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from functools import cache

from acode_sync.sql import queries

_MARKER = re.compile(r"<[a-z_]+>")
# The canonical form of a time, digits in range (docs/schema.md); the cast then refuses
# an impossible date such as February 30.
NOT_CANONICAL = "is not a canonical RFC 3339 UTC time (YYYY-MM-DDTHH:MM:SS.ffffffZ)"
CANONICAL_TIMESTAMP_PATTERN = (
    r"^\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])T([01]\d|2[0-3]):[0-5]\d:[0-5]\d\.\d{6}Z$"
)


class Kind(Enum):
    TEXT = "text"
    JSONB = "jsonb"
    TIMESTAMP = "timestamptz"


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    kind: Kind = Kind.TEXT
    default: str | None = None  # an SQL literal used when the payload lacks the key


@dataclass(frozen=True)
class TableSpec:
    entity_type: str
    table: str
    id_column: str
    columns: tuple[Column, ...]

    def _value(self, column: Column) -> str:
        if column.name == self.id_column:
            return "d.entity_id"
        if column.name == "session_id":
            return "d.session_id"
        if column.name == "updated_at":
            # The version is the key's; a payload that says otherwise is refused.
            return (
                "CASE WHEN d.p->>'updated_at' IS NULL OR d.p->>'updated_at' = d.version_text "
                "THEN d.version ELSE acode.refuse_timestamp('updated_at', d.p->>'updated_at', "
                "'is not the version in the idempotency key') END"
            )
        if column.name == "created_at":
            # Most often the version itself (a new entity): no need to match the pattern.
            return (
                "CASE WHEN d.p->>'created_at' IS NULL OR d.p->>'created_at' = d.version_text "
                "THEN d.version "
                f"WHEN d.p->>'created_at' ~ '{CANONICAL_TIMESTAMP_PATTERN}' "
                "THEN (d.p->>'created_at')::timestamptz "
                "ELSE acode.refuse_timestamp('created_at', d.p->>'created_at', "
                f"'{NOT_CANONICAL}') END"
            )
        if column.kind is Kind.JSONB:
            return f"nullif(d.p->'{column.name}', 'null'::jsonb)"
        if column.default is not None:
            return f"coalesce(d.p->>'{column.name}', {column.default})"
        return f"d.p->>'{column.name}'"

    @property
    def key_columns(self) -> tuple[str, ...]:
        """The primary key: the session (the distribution column, docs/postgres.md), then
        the entity id; a Session's id is its session."""
        if self.id_column == "session_id":
            return ("session_id",)
        return ("session_id", self.id_column)

    def session_expression(self, first_parameter: int) -> str:
        """The entity's session in the incoming block: the payload's, else the record's.
        Every record needs it before the round knows which records are written (and so
        parsed): the payload is parsed here only for a record whose sender could not see
        that its session is the record's own (postgres.session_is_the_records)."""
        if self.id_column == "session_id":
            return "r.entity_id"
        payload = f"{_payload_text(first_parameter, 'r')}::jsonb"
        return (
            f"CASE WHEN r.session_unseen THEN coalesce(({payload})->>'session_id', "
            "r.record_session) ELSE r.record_session END"
        )

    def incoming_block(self, first_parameter: int) -> str:
        """This table's records in the round statement; its five arguments are numbered
        from `first_parameter` (see ARGUMENTS_PER_TABLE)."""
        block = queries("postgres")["incoming_entities"].replace(
            "<session>", self.session_expression(first_parameter)
        )
        for offset, marker in enumerate(_ARGUMENT_MARKERS):
            block = block.replace(marker, f"${first_parameter + offset}")
        return _filled(
            block.replace("<entity_type>", self.entity_type)
            .replace("<t>", self.table)
            .replace("<no_canonical_digest>", f"'\\x{NO_CANONICAL_DIGEST.hex()}'")
        )

    def apply_block(self, first_parameter: int) -> str:
        """This table's last-write-wins decision, conflicts and upsert; its arguments are
        numbered from `first_parameter`, as in incoming_block."""
        names = [c.name for c in self.columns]
        return _filled(
            queries("postgres")["apply_entities"]
            .replace("<payload>", f"{_payload_text(first_parameter, 'd')}::jsonb")
            .replace("<entity_type>", self.entity_type)
            .replace("<t>", self.table)
            .replace("<id_column>", self.id_column)
            .replace("<key_columns>", ", ".join(self.key_columns))
            .replace("<columns>", ", ".join(names))
            .replace("<values>", ", ".join(self._value(c) for c in self.columns))
            .replace("<known_keys>", "{" + ",".join(names) + "}")
            .replace(
                "<updates>",
                ", ".join(f"{n} = excluded.{n}" for n in names if n not in self.key_columns),
            )
        )

    def row_from_payload(self) -> str:
        """The table's row (its columns, then `extra`) made from a payload exactly as the
        round makes it, for a select from `d` (entity_id, session_id, version,
        version_text, p): a version the history recorded, as a restore needs it."""
        known = "{" + ",".join(c.name for c in self.columns) + "}"
        values = (f"{self._value(c)} AS {c.name}" for c in self.columns)
        return ", ".join([*values, f"d.p - '{known}'::text[] AS extra"])


def _payload_text(first_parameter: int, alias: str) -> str:
    """A record's payload as text, cut from the round's blob at its offset and length."""
    payloads = f"${first_parameter + _ARGUMENT_MARKERS.index('<payloads>')}"
    return (
        f"convert_from(substring({payloads}::bytea FROM {alias}.start FOR {alias}.length), 'UTF8')"
    )


def _filled(sql: str) -> str:
    if _MARKER.search(sql):
        raise AssertionError(f"unfilled marker in the round statement: {sql[:80]!r}")
    return sql


# Each table's arguments in the round statement, in this order: see postgres.Columns.
_ARGUMENT_MARKERS = ("<fields>", "<payloads>", "<starts>", "<lengths>", "<digests>")
ARGUMENTS_PER_TABLE = len(_ARGUMENT_MARKERS)
# In <digests>, a record's canonical digest the sender left to the round (no SHA-256 is
# all zeros); the statement's <no_canonical_digest> is this, as a bytea literal.
NO_CANONICAL_DIGEST = bytes(32)


_TS = Kind.TIMESTAMP
_STAMPS = (Column("created_at", _TS), Column("updated_at", _TS))

TABLES: Mapping[str, TableSpec] = {
    spec.entity_type: spec
    for spec in (
        TableSpec(
            "Session",
            "sessions",
            "session_id",
            (
                Column("session_id"),
                Column("state", default="'CREATED'"),
                Column("title"),
                Column("metadata", Kind.JSONB),
                *_STAMPS,
            ),
        ),
        TableSpec(
            "SessionEvent",
            "session_events",
            "event_id",
            (
                Column("event_id"),
                Column("session_id"),
                Column("event_type"),
                Column("payload", Kind.JSONB),
                *_STAMPS,
            ),
        ),
        TableSpec(
            "SessionTask",
            "session_tasks",
            "task_id",
            (Column("task_id"), Column("session_id"), Column("status"), Column("title"), *_STAMPS),
        ),
        TableSpec(
            "Step",
            "steps",
            "step_id",
            (
                Column("step_id"),
                Column("task_id"),
                Column("session_id"),
                Column("status"),
                Column("description"),
                *_STAMPS,
            ),
        ),
        TableSpec(
            "ToolCall",
            "tool_calls",
            "tool_call_id",
            (
                Column("tool_call_id"),
                Column("step_id"),
                Column("session_id"),
                Column("name"),
                Column("arguments", Kind.JSONB),
                Column("result", Kind.JSONB),
                Column("status", default="'pending'"),
                *_STAMPS,
            ),
        ),
        TableSpec(
            "Artifact",
            "artifacts",
            "artifact_id",
            (
                Column("artifact_id"),
                Column("session_id"),
                Column("type"),
                Column("content"),
                Column("name"),
                *_STAMPS,
            ),
        ),
    )
}


# The round statement's tables, in a fixed order. $1 is the origin, then five arguments
# per table present in the round (see postgres.Columns), in this order.
ENTITY_TYPES: tuple[str, ...] = tuple(TABLES)
FIRST_TABLE_ARGUMENT = 2


def history_argument(entity_types: tuple[str, ...]) -> int:
    """With the version history on, the argument after the tables': its retention."""
    return FIRST_TABLE_ARGUMENT + len(entity_types) * ARGUMENTS_PER_TABLE


def _history_block(tables: list[TableSpec]) -> str:
    sql = queries("postgres")
    retention = f"${history_argument(tuple(spec.entity_type for spec in tables))}"
    versions = "\nUNION ALL\n".join(
        sql["history_versions"]
        .replace("<entity_type>", spec.entity_type)
        .replace("<t>", spec.table)
        .replace("<retention>", retention)
        for spec in tables
    )
    return sql["append_history"].replace("<written_versions>", versions)


@cache
def round_sql(entity_types: tuple[str, ...], *, history: bool) -> str:
    """The round statement for the entity types a round holds (in ENTITY_TYPES order).
    Behind a transaction-pooling PgBouncer nothing is prepared once: the statement is
    parsed and planned for every round, in time proportional to the tables it names."""
    if not entity_types or list(entity_types) != [t for t in ENTITY_TYPES if t in entity_types]:
        raise ValueError(f"entity types not in ENTITY_TYPES order: {entity_types!r}")
    sql = queries("postgres")
    tables = [TABLES[t] for t in entity_types]
    first = [FIRST_TABLE_ARGUMENT + i * ARGUMENTS_PER_TABLE for i in range(len(tables))]
    blocks = [spec.incoming_block(at) for spec, at in zip(tables, first, strict=True)]
    blocks += [spec.apply_block(at) for spec, at in zip(tables, first, strict=True)]
    if history:
        blocks.append(_history_block(tables))
    outcomes = "\nUNION ALL\n".join(
        sql["round_outcome"].replace("<t>", spec.table) for spec in tables
    )
    return _filled("WITH " + ",\n".join(blocks) + "\n" + outcomes)


# Every table: the longest statement (the size the statement cache must admit).
APPLY_ROUND_SQL: str = round_sql(ENTITY_TYPES, history=False)
APPLY_ROUND_WITH_HISTORY_SQL: str = round_sql(ENTITY_TYPES, history=True)
