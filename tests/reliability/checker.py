"""The reliability checker: the ledger of accepted records against what PostgreSQL holds.

It trusts nothing the sync engine keeps for itself (never `applied_keys`, never the
summaries). Its sources:

- the **ledger**: one JSON line per record whose SQLite commit returned (written by
  tests/reliability/loadgen.py), the definition of "accepted";
- the **audit table**: a test-only trigger on every entity table writes one row per row
  PostgreSQL writes (no unique constraint), so a key applied twice shows up twice;
- the **entity tables**: the row PostgreSQL holds for each entity;
- `acode.conflicts` rows with `winner = 'current'`: the documented outcome of a record
  that lost last-write-wins (it changed nothing, by design);
- the workspaces' **outbox states**: `dead` (a dead letter, the record's own documented
  state) and `pending` (stuck, once everything has quiesced), and the outbox keys that
  are not in the ledger (unledgered: a writer died between its commit and its ledger
  line; reported apart, never as lost);
- the daemons' **JSON logs**: each `duplicate` line is a delivery that PostgreSQL
  recognised as already applied (a resend).

`compare()` is pure, so the checker itself is unit-tested on hand-made data.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import asyncpg

from acode_sync.domain import format_timestamp
from acode_sync.pg_tables import TABLES
from acode_sync.workspace import database_path
from tests.pg import AUDIT_TABLE


@dataclass(frozen=True, slots=True)
class LedgerRecord:
    """One accepted record: its key, entity, version and origin, and one column's value
    (`check_column` = `check_value`) that the PostgreSQL row must show if it wins."""

    key: str
    entity_type: str
    entity_id: str
    updated_at: str  # canonical form
    origin: str
    digest: str = ""
    check_column: str | None = None
    check_value: Any = None

    @property
    def entity(self) -> tuple[str, str]:
        return (self.entity_type, self.entity_id)

    @property
    def order(self) -> tuple[str, str, str]:
        """The last-write-wins order: (updated_at, origin_id, idempotency_key)."""
        return (self.updated_at, self.origin, self.key)


@dataclass(frozen=True, slots=True)
class AuditRow:
    """One entity write PostgreSQL committed (one row per trigger firing)."""

    key: str
    entity_type: str
    entity_id: str
    updated_at: str
    origin: str


@dataclass(frozen=True, slots=True)
class EntityRow:
    """The row PostgreSQL holds for an entity."""

    entity_type: str
    entity_id: str
    key: str
    updated_at: str
    origin: str
    columns: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RejectedRow:
    """A `conflicts` row with winner 'current': the incoming record lost LWW."""

    incoming_key: str
    incoming_order: tuple[str, str, str]
    current_order: tuple[str, str, str]


@dataclass(frozen=True, slots=True)
class OutboxRow:
    workspace: str
    key: str
    state: str
    attempts: int


@dataclass
class Report:
    ledgered: int = 0
    applied: int = 0
    dead: int = 0
    superseded: int = 0  # lost last-write-wins, recorded in conflicts (not lost)
    lost: list[str] = field(default_factory=list)
    duplicates: dict[str, int] = field(default_factory=dict)
    wrong_winners: list[str] = field(default_factory=list)
    stuck: list[str] = field(default_factory=list)
    unledgered: list[str] = field(default_factory=list)
    resends: int = 0

    @property
    def clean(self) -> bool:
        return not (self.lost or self.duplicates or self.wrong_winners or self.stuck)

    def line(self) -> str:
        return (
            f"ledgered {self.ledgered}, applied {self.applied}, dead {self.dead}, superseded "
            f"{self.superseded}, lost {len(self.lost)}, duplicates {len(self.duplicates)}, "
            f"wrong winners {len(self.wrong_winners)}, stuck {len(self.stuck)}, unledgered "
            f"{len(self.unledgered)}, resends {self.resends}"
        )

    def details(self, limit: int = 10) -> str:
        parts = [self.line()]
        for name, items in (
            ("lost", self.lost),
            ("duplicates", [f"{k} x{n}" for k, n in self.duplicates.items()]),
            ("wrong winners", self.wrong_winners),
            ("stuck", self.stuck),
        ):
            if items:
                parts.append(f"{name}: {items[:limit]}")
        return "\n".join(parts)


def compare(
    ledger: Sequence[LedgerRecord],
    audit: Sequence[AuditRow],
    entities: Sequence[EntityRow],
    rejected: Sequence[RejectedRow],
    outbox: Sequence[OutboxRow],
    resends: int = 0,
) -> Report:
    report = Report(ledgered=len(ledger), resends=resends)
    writes = Counter(row.key for row in audit)
    report.applied = len(writes)
    report.duplicates = {key: n for key, n in sorted(writes.items()) if n > 1}
    dead = {row.key for row in outbox if row.state == "dead"}
    report.stuck = sorted(f"{row.workspace}: {row.key}" for row in outbox if row.state == "pending")
    ledger_keys = {record.key for record in ledger}
    report.unledgered = sorted({row.key for row in outbox} - ledger_keys)

    lost_lww: set[str] = set()
    for conflict in rejected:
        if conflict.current_order > conflict.incoming_order:
            lost_lww.add(conflict.incoming_key)
        else:  # PostgreSQL kept a version that does not win the LWW order
            report.wrong_winners.append(
                f"conflict on {conflict.incoming_key}: current {conflict.current_order} kept "
                f"over incoming {conflict.incoming_order}"
            )

    for record in ledger:
        if record.key in writes:
            continue
        if record.key in dead:
            report.dead += 1
        elif record.key in lost_lww:
            report.superseded += 1
        else:
            report.lost.append(record.key)

    # The winner of each entity: the greatest LWW order among every record that must have
    # reached PostgreSQL (ledgered, not dead) and every write PostgreSQL made.
    candidates: dict[tuple[str, str], dict[str, tuple[str, str, str]]] = defaultdict(dict)
    by_key = {record.key: record for record in ledger}
    for record in ledger:
        if record.key not in dead:
            candidates[record.entity][record.key] = record.order
    for row in audit:
        candidates[(row.entity_type, row.entity_id)][row.key] = (
            row.updated_at,
            row.origin,
            row.key,
        )
    held = {(e.entity_type, e.entity_id): e for e in entities}
    written = {(e.entity_type, e.entity_id) for e in audit}
    for entity, orders in sorted(candidates.items()):
        winner = max(orders.values())
        current = held.get(entity)
        if current is None:
            if entity in written:  # PostgreSQL wrote it, yet holds no current
                report.wrong_winners.append(f"{entity}: no current, expected {winner[2]}")
            continue  # nothing of it ever reached PostgreSQL: reported as lost
        if (current.updated_at, current.origin, current.key) != winner:
            report.wrong_winners.append(f"{entity}: holds {current.key}, expected {winner[2]}")
            continue
        expected = by_key.get(current.key)
        if expected is not None and expected.check_column is not None:
            value = current.columns.get(expected.check_column)
            if value != expected.check_value:
                report.wrong_winners.append(
                    f"{entity}: {expected.check_column} is {value!r}, the winner {current.key} "
                    f"wrote {expected.check_value!r}"
                )
    return report


# --------------------------------------------------------------------------- gathering


def read_ledger(paths: Iterable[Path]) -> list[LedgerRecord]:
    """Every complete line of every ledger (a writer killed mid-line leaves a partial
    last line: that record is unledgered)."""
    records = []
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            try:
                raw = json.loads(line)
            except ValueError:
                continue
            records.append(
                LedgerRecord(
                    key=raw["key"],
                    entity_type=raw["entity_type"],
                    entity_id=raw["entity_id"],
                    updated_at=raw["updated_at"],
                    origin=raw["origin"],
                    digest=raw.get("digest", ""),
                    check_column=raw.get("check_column"),
                    check_value=raw.get("check_value"),
                )
            )
    return records


def read_outbox(workspaces: Iterable[Path]) -> list[OutboxRow]:
    rows = []
    for workspace in workspaces:
        conn = sqlite3.connect(database_path(workspace), timeout=30)
        try:
            rows += [
                OutboxRow(str(workspace), str(key), str(state), int(attempts))
                for key, state, attempts in conn.execute(
                    "SELECT idempotency_key, state, attempts FROM outbox"
                )
            ]
        finally:
            conn.close()
    return rows


def count_resends(logs: Iterable[Path]) -> int:
    """`duplicate` lines in the daemons' JSON logs (at debug, as the rig runs them):
    deliveries PostgreSQL already had."""
    count = 0
    for path in logs:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            if '"duplicate"' not in line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("event") == "duplicate":
                count += 1
    return count


def _ts(value: datetime) -> str:
    return format_timestamp(value)


def _decode(value: Any) -> Any:
    if isinstance(value, datetime):
        return _ts(value)
    return value


async def read_postgres(dsn: str) -> tuple[list[AuditRow], list[EntityRow], list[RejectedRow]]:
    conn = await asyncpg.connect(dsn)
    try:
        type_of = {spec.table: spec.entity_type for spec in TABLES.values()}
        audit = [
            AuditRow(
                key=r["idempotency_key"],
                entity_type=type_of[r["entity_table"]],
                entity_id=r["entity_id"],
                updated_at=_ts(r["updated_at"]),
                origin=r["origin_id"],
            )
            for r in await conn.fetch(
                f"SELECT entity_table, entity_id, idempotency_key, origin_id, updated_at "
                f"FROM {AUDIT_TABLE}"
            )
        ]
        entities = []
        for spec in TABLES.values():
            for r in await conn.fetch(f"SELECT * FROM acode.{spec.table}"):
                columns = {k: _decode(v) for k, v in dict(r).items()}
                entities.append(
                    EntityRow(
                        entity_type=spec.entity_type,
                        entity_id=r[spec.id_column],
                        key=r["idempotency_key"],
                        updated_at=_ts(r["updated_at"]),
                        origin=r["origin_id"],
                        columns=columns,
                    )
                )
        rejected = [
            RejectedRow(
                incoming_key=r["incoming_key"],
                incoming_order=(
                    _ts(r["incoming_updated_at"]),
                    r["incoming_origin"],
                    r["incoming_key"],
                ),
                current_order=(_ts(r["current_updated_at"]), r["current_origin"], r["current_key"]),
            )
            for r in await conn.fetch(
                "SELECT incoming_key, incoming_updated_at, incoming_origin, current_key, "
                "current_updated_at, current_origin FROM acode.conflicts WHERE winner = 'current'"
            )
        ]
        return audit, entities, rejected
    finally:
        await conn.close()


def check(
    *, dsn: str, ledgers: Iterable[Path], workspaces: Iterable[Path], logs: Iterable[Path] = ()
) -> Report:
    """Run once everything has quiesced (no writer, every daemon stopped or idle)."""
    ledger = read_ledger(ledgers)
    outbox = read_outbox(workspaces)
    audit, entities, rejected = anyio.run(read_postgres, dsn)
    return compare(ledger, audit, entities, rejected, outbox, count_resends(logs))
