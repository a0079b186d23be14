"""`acode db verify`: compare a workspace with PostgreSQL and say where they differ.

Each table is read in pages, in id order: a page of the workspace's entities (each with
its current version's outbox record, if kept) in one SQLite read transaction, then the
versions PostgreSQL holds of those ids (primary-key probes). Memory holds one page, and
the work grows with the workspace, not with the central tables.

A moving target raises no false alarm: an entity whose current version is still pending
in the outbox (in flight) is not compared, and PostgreSQL has committed every version the
workspace marked processed. A version saved and shipped between the two reads makes
PostgreSQL look newer than the page read; every difference is therefore read again, on
both sides, before it is reported.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.to_thread

from acode_sync.domain import (
    ENTITY_CLASSES,
    Entity,
    format_timestamp,
    idempotency_key,
    utc_now,
)
from acode_sync.outbox import Outbox
from acode_sync.pg_tables import TABLES
from acode_sync.postgres import PostgresTarget
from acode_sync.sql import queries
from acode_sync.store import encode_json, outbox_row
from acode_sync.workspace import (
    DEFAULT_BUSY_TIMEOUT,
    DIALECT,
    OpenOptions,
    database_path,
    open_workspace,
    translated,
    write_transaction,
)

PAGE_SIZE: Final = 5000
RECHECKS: Final = 3  # a difference still moving after this many reads is reported
LISTED_PER_KIND: Final = 20  # the text report names this many of each kind
_Q = queries(DIALECT)


class Kind(StrEnum):
    """What a difference is. All but SUPERSEDED make the verify fail."""

    MISSING = "missing"  # PostgreSQL has no version of the entity
    STALE = "stale"  # PostgreSQL holds an older version
    DIGEST_DIFFERS = "digest_differs"  # the same version, another payload: corruption
    NEWER_CENTRALLY = "newer_centrally"  # a newer version from this workspace's origin
    DEAD_LETTER = "dead_letter"  # the current version's record is dead: never shipped
    SUPERSEDED = "superseded"  # another origin's newer version won: expected


REPAIRABLE: Final = frozenset({Kind.MISSING, Kind.STALE})


@dataclass(frozen=True, slots=True)
class Difference:
    kind: Kind
    entity_type: str
    entity_id: str
    local_version: str
    central_version: str | None = None
    central_origin: str | None = None

    def line(self) -> str:
        central = "" if self.central_version is None else f", central {self.central_version}"
        origin = "" if self.central_origin is None else f" from {self.central_origin}"
        return f"{self.entity_type} {self.entity_id}: local {self.local_version}{central}{origin}"


@dataclass(slots=True)
class VerifyReport:
    origin_id: str
    checked: int = 0  # entities compared (their current version marked processed)
    equal: int = 0
    in_flight: int = 0  # current version still pending in the outbox: not compared
    digest_unknown: int = 0  # PostgreSQL holds no digest (rows applied before schema 3)
    differences: list[Difference] = field(default_factory=list)
    queued: int = 0  # outbox records queued by --repair

    @property
    def problems(self) -> list[Difference]:
        return [d for d in self.differences if d.kind is not Kind.SUPERSEDED]

    @property
    def ok(self) -> bool:
        return not self.problems

    def by_kind(self) -> dict[str, list[Difference]]:
        grouped: dict[str, list[Difference]] = {kind.value: [] for kind in Kind}
        for difference in self.differences:
            grouped[difference.kind.value].append(difference)
        return grouped

    def as_dict(self) -> dict[str, Any]:
        return {
            "origin_id": self.origin_id,
            "ok": self.ok,
            "checked": self.checked,
            "equal": self.equal,
            "in_flight": self.in_flight,
            "digest_unknown": self.digest_unknown,
            "queued": self.queued,
            "differences": {
                kind: [
                    {
                        "entity_type": d.entity_type,
                        "entity_id": d.entity_id,
                        "local_version": d.local_version,
                        "central_version": d.central_version,
                        "central_origin": d.central_origin,
                    }
                    for d in found
                ]
                for kind, found in self.by_kind().items()
            },
        }

    def lines(self) -> list[str]:
        out = [
            f"checked {self.checked} entities: {self.equal} equal, {self.in_flight} in flight "
            f"(not compared), {self.digest_unknown} without a central digest"
        ]
        for kind, found in self.by_kind().items():
            if not found:
                continue
            note = " (expected: last write wins)" if kind == Kind.SUPERSEDED else ""
            out.append(f"{kind}: {len(found)}{note}")
            out += [f"  {d.line()}" for d in found[:LISTED_PER_KIND]]
            if len(found) > LISTED_PER_KIND:
                out.append(f"  ... and {len(found) - LISTED_PER_KIND} more (--json lists all)")
        if self.queued:
            out.append(f"repair: {self.queued} outbox record(s) queued; the syncer ships them")
        out.append("ok" if self.ok else f"{len(self.problems)} difference(s)")
        return out


@dataclass(frozen=True, slots=True)
class LocalEntity:
    """An entity as the workspace holds it, with the state of its current version's
    record: 'pending', 'dead' or 'processed' (also when the record is gone: pruned after
    it was shipped, or never written, as for restored rows)."""

    entity_id: str
    version: str | None
    state: str
    payload: bytes  # as shipped if the record is kept, else rebuilt from the row

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.payload).digest()


@dataclass(frozen=True)
class _TableReads:
    cls: type[Entity]
    id_column: str
    columns: tuple[str, ...]
    page: str
    one: str

    @classmethod
    def of(cls, entity: type[Entity]) -> _TableReads:
        id_column = TABLES[entity.entity_type].id_column
        columns = tuple(f.name for f in fields(entity))

        def filled(name: str) -> str:
            return (
                _Q[name]
                .replace("<columns>", ", ".join(f"t.{c}" for c in columns))
                .replace("<table>", entity.table)
                .replace("<entity_type>", entity.entity_type)
                .replace("<id_column>", id_column)
            )

        return cls(entity, id_column, columns, filled("verify_entities"), filled("verify_entity"))

    def payload(self, values: Sequence[Any], extra: str | None) -> bytes:
        """The payload the store writes for this row (store.WorkspaceDatabase.save): its
        columns, then the unknown keys it keeps (`extra`, written by a restore)."""
        row = dict(zip(self.columns, values, strict=True))
        for column in self.cls.json_columns:
            if row[column] is not None:
                row[column] = json.loads(row[column])
        if extra is not None:
            row |= {key: value for key, value in json.loads(extra).items() if key not in row}
        return encode_json(row).encode()

    def entity(self, values: Sequence[Any], mark: int) -> LocalEntity:
        width = len(self.columns)
        extra, outbox_id, sync_state, payload = values[width:]
        if outbox_id is None:
            state = "processed"
        elif sync_state is not None:
            state = str(sync_state)
        else:  # no sync row: processed up to the mark, pending past it
            state = "processed" if outbox_id <= mark else "pending"
        row = values[:width]
        version = row[self.columns.index("updated_at")]
        return LocalEntity(
            str(row[self.columns.index(self.id_column)]),
            version,
            state,
            payload if payload is not None else self.payload(row, extra),
        )


READS: Final = {cls.entity_type: _TableReads.of(cls) for cls in ENTITY_CLASSES}


class LocalSide:
    """The workspace's side: read-only pages, each in one read transaction."""

    def __init__(self, workspace: Path, *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT) -> None:
        self.workspace = workspace
        self.outbox = Outbox(workspace, busy_timeout=busy_timeout)  # checks the schema
        self.origin_id = self.outbox.origin_id

    def close(self) -> None:
        self.outbox.close()

    def _snapshot(self, read: Any) -> list[LocalEntity]:
        conn = self.outbox.conn
        conn.execute("BEGIN")
        try:
            mark = int(conn.execute(_Q["progress_mark"]).fetchone()[0])
            return list(read(conn, mark))
        finally:
            conn.execute("COMMIT")

    def page(self, entity_type: str, after: str, limit: int) -> list[LocalEntity]:
        reads = READS[entity_type]

        def read(conn: Any, mark: int) -> Iterable[LocalEntity]:
            rows = conn.execute(reads.page, {"after": after, "limit": limit})
            return [reads.entity(values, mark) for values in rows]

        return translated(self.outbox.path, self._snapshot, read)

    def entities(self, entity_type: str, entity_ids: Sequence[str]) -> list[LocalEntity]:
        reads = READS[entity_type]

        def read(conn: Any, mark: int) -> Iterable[LocalEntity]:
            for entity_id in entity_ids:
                values = conn.execute(reads.one, {"entity_id": entity_id}).fetchone()
                if values is not None:
                    yield reads.entity(values, mark)

        return translated(self.outbox.path, self._snapshot, read)


def judge(
    entity_type: str, local: LocalEntity, central: Any | None, origin_id: str
) -> Difference | None:
    """Compare one entity whose current version was shipped with what PostgreSQL holds
    (a row of PostgresTarget.entity_versions, or None)."""
    version = str(local.version)
    if central is None:
        return Difference(Kind.MISSING, entity_type, local.entity_id, version)
    held = format_timestamp(central["updated_at"])
    if held == version:
        digest = central["payload_digest"]
        if digest is None or bytes(digest) == local.digest:
            return None
        kind = Kind.DIGEST_DIFFERS
    elif held < version:
        kind = Kind.STALE
    elif central["origin_id"] != origin_id:
        kind = Kind.SUPERSEDED
    else:
        kind = Kind.NEWER_CENTRALLY
    return Difference(kind, entity_type, local.entity_id, version, held, central["origin_id"])


@dataclass(kw_only=True)
class Verifier:
    workspace: Path
    target: PostgresTarget
    page_size: int = PAGE_SIZE
    busy_timeout: float = DEFAULT_BUSY_TIMEOUT

    async def run(self, *, repair: bool = False) -> VerifyReport:
        local = await anyio.to_thread.run_sync(
            lambda: LocalSide(self.workspace, busy_timeout=self.busy_timeout)
        )
        try:
            report = VerifyReport(local.origin_id)
            for entity_type in READS:
                await self._verify_table(local, entity_type, report)
        finally:
            await anyio.to_thread.run_sync(local.close)
        if repair:
            report.queued = await self._repair(report.problems)
        return report

    async def _verify_table(self, local: LocalSide, entity_type: str, report: VerifyReport) -> None:
        after = ""
        while True:
            page = await anyio.to_thread.run_sync(local.page, entity_type, after, self.page_size)
            if not page:
                return
            after = page[-1].entity_id
            found = await self._compare(local.origin_id, entity_type, page, report)
            for _ in range(RECHECKS):
                if not found:
                    break
                # Read again, both sides: what moved in between was in flight.
                ids = [d.entity_id for d in found]
                again = await anyio.to_thread.run_sync(local.entities, entity_type, ids)
                found = await self._compare(local.origin_id, entity_type, again, None)
            report.differences += found

    async def _compare(
        self,
        origin_id: str,
        entity_type: str,
        entities: Sequence[LocalEntity],
        report: VerifyReport | None,
    ) -> list[Difference]:
        """The differences among `entities`; the counts go to `report` (first reads only)."""
        shipped = [e for e in entities if e.state != "pending" and e.version is not None]
        rows = await self.target.entity_versions(entity_type, [e.entity_id for e in shipped])
        central = {row["entity_id"]: row for row in rows}
        found: list[Difference] = []
        for entity in shipped:
            if entity.state == "dead":
                found.append(
                    Difference(Kind.DEAD_LETTER, entity_type, entity.entity_id, str(entity.version))
                )
                continue
            held = central.get(entity.entity_id)
            difference = judge(entity_type, entity, held, origin_id)
            if difference is not None:
                found.append(difference)
            elif report is not None:
                report.equal += 1
                report.digest_unknown += held is not None and held["payload_digest"] is None
        if report is not None:
            report.checked += len(shipped)
            report.in_flight += len(entities) - len(shipped)
        return found

    async def _repair(self, problems: Sequence[Difference]) -> int:
        """Queue each missing or stale entity's current version as an ordinary outbox
        record: its record again if it is kept, else a new one written as the store writes
        (the key of that version, the payload of the row). An entity saved since it was
        read has a newer record of its own and is left alone. (PostgreSQL applies it
        whatever keys it keeps: a version newer than the one held wins, and one of an
        entity it lacks creates it.)"""
        repairable = [d for d in problems if d.kind in REPAIRABLE]
        if not repairable:
            return 0
        return await anyio.to_thread.run_sync(self._queue, repairable)

    def _queue(self, repairable: Sequence[Difference]) -> int:
        conn = open_workspace(
            self.workspace, OpenOptions(busy_timeout=self.busy_timeout), create=False
        )
        try:
            return translated(database_path(self.workspace), self._requeue, conn, repairable)
        finally:
            conn.close()

    def _requeue(self, conn: Any, repairable: Sequence[Difference]) -> int:
        queued = 0
        now = format_timestamp(utc_now())
        with write_transaction(conn):
            for difference in repairable:
                reads = READS[difference.entity_type]
                values = conn.execute(reads.one, {"entity_id": difference.entity_id}).fetchone()
                if values is None:
                    continue
                row = values[: len(reads.columns)]
                version = row[reads.columns.index("updated_at")]
                if version != difference.local_version:
                    continue
                key = idempotency_key(difference.entity_type, difference.entity_id, version)
                # Based on what PostgreSQL holds, not on the version the save replaced:
                # PostgreSQL merely lacks the versions in between (a restored backup), which
                # must not make the repair a conflict.
                base = difference.central_version
                kept = conn.execute(_Q["record_by_key"], (key,)).fetchone()
                if kept is not None:
                    conn.execute(_Q["requeue_record"], (base, kept[0]))
                else:
                    session_id = row[reads.columns.index("session_id")]
                    conn.execute(
                        _Q["insert_outbox"],
                        outbox_row(key, difference.entity_type, difference.entity_id, session_id,
                                   reads.payload(row, values[len(reads.columns)]).decode(), base,
                                   now),
                    )  # fmt: skip
                queued += 1
        return queued
