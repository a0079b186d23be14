"""The syncer's side of a workspace database: claim, mark, fail, replay, prune.

Synchronous; runs in a worker thread. Reads are single statements in autocommit mode
(a claim's reads share one short read transaction), so no read transaction stays
open between batches (it would hold back WAL checkpoints and grow the agent's -wal
file). Writes never touch `outbox_records` (the pages holding
the payloads): a shipped batch moves the mark in `outbox_progress` (one row per batch);
only records with a state of their own (failed, held back) get an `outbox_sync` row.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from operator import itemgetter
from pathlib import Path
from typing import Any, Final, NamedTuple

from acode_sync.domain import Clock, format_timestamp, utc_now
from acode_sync.errors import SchemaMismatchError, WorkspaceNotCreatedError
from acode_sync.migrations import latest_version, load_migrations
from acode_sync.retry import RecordRetryPolicy
from acode_sync.sql import queries
from acode_sync.workspace import (
    DIALECT,
    OpenOptions,
    Synchronous,
    database_path,
    open_workspace,
    origin_id,
    schema_version,
    translated,
    write_transaction,
)

PRUNE_CHUNK: Final = 500
# A save that arrives while a batch of 1000 is being marked waits for one chunk, not for
# the whole batch (~2 ms, longer when the cores are busy): see Outbox._mark_processed.
MARK_CHUNK: Final = 100
MARK_PAUSE: Final = 0.0001
SYNCER_CACHE_KIB: Final = -512  # negative: KiB (SQLite's default is 2 MiB per connection)
_Q = queries(DIALECT)
# The claim's two sides share the block that gathers the entities waiting out a backoff.
CLAIM_STATEMENTS: Final = {
    name: _Q[name].replace("<waiting_entities>", _Q["waiting_entities"])
    for name in ("claim_tracked", "claim_past_mark")
}


class OutboxRecord(NamedTuple):
    """A claimed record (a tuple: a claim makes a thousand of them)."""

    outbox_id: int
    idempotency_key: str
    entity_type: str
    entity_id: str
    session_id: str | None
    payload: bytes  # as stored: UTF-8 unless a writer stored something else
    base_updated_at: str | None
    created_at: str
    attempts: int
    tracked: bool = False  # it has a sync row (else it is past the mark)
    blocked: bool = False  # an earlier record of its entity is waiting out a backoff
    readable: bool = True  # False: a text column is not valid UTF-8 (see Outbox.claim)
    # As the store wrote them at the save: the SHA-256 of the payload, then of its jsonb
    # text (64 bytes); None where it wrote none (the syncer computes the second then).
    payload_digests: bytes | None = None


@dataclass(frozen=True, slots=True)
class Failure:
    outbox_id: int
    error: str


@dataclass(frozen=True, slots=True)
class FailureResult:
    outbox_id: int
    attempts: int
    dead: bool


class Outbox:
    """One workspace's outbox, opened by a syncer. It never creates or migrates."""

    def __init__(self, workspace: Path, *, busy_timeout: float, clock: Clock = utc_now) -> None:
        self.path = database_path(workspace)
        self.clock = clock
        # synchronous=NORMAL: the syncer's own commits (marks) need not reach the disk at
        # once: lost on a power cut, they are redone (the records are sent again and end as
        # duplicates), and the agent's saves stay FULL. Its write lock is held that much
        # shorter, so the agent's saves wait less.
        options = OpenOptions(busy_timeout=busy_timeout, synchronous=Synchronous.NORMAL)
        self.conn = open_workspace(workspace, options, create=False, run_migrations=False)
        self.conn.execute(f"PRAGMA cache_size = {SYNCER_CACHE_KIB}")  # reads once, in order
        try:
            self.origin_id = translated(self.path, self._check_schema)
        except BaseException:
            self.conn.close()
            raise

    def _check_schema(self) -> str:
        version = schema_version(self.conn)
        supported = latest_version(load_migrations(DIALECT))
        if version == 0:
            raise WorkspaceNotCreatedError(
                f"{self.path}: no schema yet (schema version 0), this syncer needs {supported}"
            )
        if version != supported:
            raise SchemaMismatchError(
                f"{self.path}: schema version {version}, this syncer needs {supported}",
                hint="Open the workspace with the agent or run `acode db migrate` there; "
                "syncers never migrate a workspace.",
            )
        return origin_id(self.conn)

    def close(self) -> None:
        self.conn.close()

    def claim(
        self, *, max_records: int, max_bytes: int, after: int = 0, with_blocked: bool = False
    ) -> list[OutboxRecord]:
        """Pending records past outbox id `after`, oldest first, bounded by count and by
        payload bytes. With `with_blocked`, also the records that wait behind an earlier
        record of their entity (flagged `blocked`): a batch must account for every record
        the mark will pass."""

        def _claim() -> list[OutboxRecord]:
            args = (max_records, max_bytes, after, with_blocked)
            try:
                return self._claim_rows(*args, tolerant=False)
            except sqlite3.OperationalError:
                # A writer stored text that is not UTF-8, which the driver cannot decode:
                # read the batch again tolerantly, so that only that record fails.
                return self._claim_rows(*args, tolerant=True)

        return translated(self.path, _claim)

    def _claim_rows(
        self, max_records: int, max_bytes: int, after: int, with_blocked: bool, *, tolerant: bool
    ) -> list[OutboxRecord]:
        now = format_timestamp(self.clock())
        params = {"now": now, "limit": max_records, "after": after, "with_blocked": with_blocked}
        if tolerant:
            self.conn.text_factory = _decode_tolerantly
        try:
            # One read transaction: both sides and the payloads from one snapshot. Each
            # side is in outbox_id order; together they are sorted by it (a record is on one
            # side only).
            self.conn.execute("BEGIN")
            try:
                rows = self.conn.execute(CLAIM_STATEMENTS["claim_tracked"], params).fetchall()
                rows += self.conn.execute(CLAIM_STATEMENTS["claim_past_mark"], params).fetchall()
                if rows and rows[0][6]:  # records with a sync row come first: merge by id
                    rows.sort(key=itemgetter(0))
                return self._with_payloads(rows[:max_records], max_bytes, tolerant=tolerant)
            finally:
                self.conn.execute("COMMIT")
        finally:
            self.conn.text_factory = str

    def _with_payloads(
        self, rows: Sequence[Any], max_bytes: int, *, tolerant: bool
    ) -> list[OutboxRecord]:
        """The claimed rows (in outbox_id order) with their payloads, up to `max_bytes` of
        them (the first record always). The payloads are read one row at a time and the
        read stops at the first that does not fit: a claim reads one batch of payload and
        one payload more, whatever the backlog."""
        batch: list[OutboxRecord] = []
        size = 0
        ids = json.dumps([row[0] for row in rows])
        cursor = self.conn.execute(_Q["claim_payloads"], {"ids": ids})
        try:
            for claimed, stored in zip(rows, cursor, strict=False):
                outbox_id, key, entity_type, entity_id, session_id, attempts, tracked, blocked = (
                    claimed
                )
                stored_id, payload, base_updated_at, created_at, digests = stored
                assert stored_id == outbox_id  # the same snapshot, the same order
                size += len(payload)
                if batch and size > max_bytes:
                    break
                record = OutboxRecord(
                    outbox_id, key, entity_type, entity_id, session_id, payload,
                    base_updated_at, created_at, attempts, tracked, blocked, True,
                    digests if type(digests) is bytes else None,
                )  # fmt: skip
                if tolerant and not _is_utf8(record):
                    record = record._replace(readable=False)
                batch.append(record)
        finally:
            cursor.close()
        return batch

    def mark(
        self,
        processed: Sequence[OutboxRecord],
        failures: Sequence[Failure],
        policy: RecordRetryPolicy,
        *,
        claimed: Mapping[int, OutboxRecord],
        held: Sequence[int] = (),
        through: int | None = None,
    ) -> list[FailureResult]:
        """Record a batch's outcome, after PostgreSQL committed. `processed`: the shipped
        records that have a sync row; `failures`: of records in `claimed` (the batch as
        claimed); `held`: records left pending (a sync row is written for those with
        none); `through`: the batch's last record past the mark, which becomes the mark:
        every record up to it without a sync row was shipped.

        A record is marked or failed only if it is still the one claimed (same id, key
        and payload): one deleted, re-inserted under its id or edited through the view
        since the claim is left as it is now, pending, and shipped again."""

        def _mark() -> list[FailureResult]:
            now = self.clock()
            stamp = format_timestamp(now)
            self._mark_processed(processed, stamp)
            pending = [*held, *(f.outbox_id for f in failures)]
            if not pending and through is None:
                return []
            # One short transaction: a few rows, however large the batch.
            with write_transaction(self.conn):
                if pending:
                    self.conn.execute(
                        _Q["track_pending"], {"ids": json.dumps(pending), "now": stamp}
                    )
                results = [
                    result
                    for failure in failures
                    if (
                        result := self._fail(
                            failure, claimed[failure.outbox_id], now, stamp, policy
                        )
                    )
                    is not None
                ]
                if through is not None:
                    self.conn.execute(_Q["advance_mark"], {"through": through, "now": stamp})
                return results

        return translated(self.path, _mark)

    def _mark_processed(self, processed: Sequence[OutboxRecord], stamp: str) -> None:
        """Mark records with a sync row processed, MARK_CHUNK at a time (a workspace
        upgraded from schema 2 may have many). Each chunk is one short transaction: the
        write lock is held only while SQLite runs it, never across Python code waiting for
        the GIL. Between chunks the lock is left free a moment, long enough for a save
        polling for it (workspace.FINE_LOCK_PAUSE) to take it. A crash between chunks is
        harmless: the unmarked records are sent again and end as duplicates."""
        for start in range(0, len(processed), MARK_CHUNK):  # pragma: no branch
            if start:
                time.sleep(MARK_PAUSE)
            rows = [
                {
                    "now": stamp,
                    "outbox_id": r.outbox_id,
                    "key": _stored(r),
                    "payload": r.payload,
                }
                for r in processed[start : start + MARK_CHUNK]
            ]
            with write_transaction(self.conn):
                self.conn.executemany(_Q["mark_processed"], rows)

    def _fail(
        self,
        failure: Failure,
        record: OutboxRecord,
        now: datetime,
        stamp: str,
        policy: RecordRetryPolicy,
    ) -> FailureResult | None:
        """None if the record is gone (a writer deleted it since the claim), is another
        record now (re-inserted under its id, edited) or no longer pending (updated
        through the view): there is nothing left to fail."""
        # track_pending wrote the sync row if the record had none and still exists.
        current = self.conn.execute(
            _Q["record_attempts"],
            {
                "outbox_id": record.outbox_id,
                "key": _stored(record),
                "payload": record.payload,
            },
        ).fetchone()
        if current is None:
            return None
        attempts = 1 + int(current[0])
        next_attempt = format_timestamp(policy.next_attempt(now, attempts))
        row = self.conn.execute(
            _Q["mark_failed"],
            {
                "outbox_id": failure.outbox_id,
                "error": failure.error,
                "max_attempts": policy.max_attempts,
                "next_attempt_at": next_attempt,
                "now": stamp,
            },
        ).fetchone()
        if row is None:
            return None
        self.conn.execute(_Q["record_error"], (failure.outbox_id, attempts, failure.error, stamp))
        return FailureResult(failure.outbox_id, int(row[0]), row[1] == "dead")

    def backlog(self) -> tuple[int, str | None, str | None]:
        """(pending records, created_at of the oldest, the earliest retry time)."""

        def _backlog() -> tuple[int, str | None, str | None]:
            count, oldest, next_retry = self.conn.execute(_Q["backlog"]).fetchone()
            return int(count), oldest, next_retry

        return translated(self.path, _backlog)

    def checkpoint(self) -> None:
        """Copy the WAL back into the database without waiting for readers or writers,
        so the agent's saves do not pay for it."""
        translated(self.path, self.conn.execute, "PRAGMA wal_checkpoint(PASSIVE)")

    def _prune_chunk(self, statement: str, before: str) -> int:
        with write_transaction(self.conn):
            cursor = self.conn.execute(_Q[statement], {"before": before, "limit": PRUNE_CHUNK})
            return cursor.rowcount

    def prune(self, retention: timedelta) -> int:
        """Delete processed records older than the retention, in small transactions."""
        before = format_timestamp(self.clock() - retention)
        total = 0
        for statement in ("prune_processed", "prune_passed"):
            while (deleted := translated(self.path, self._prune_chunk, statement, before)) > 0:
                total += deleted
                if deleted < PRUNE_CHUNK:
                    break

        def _progress() -> None:
            with write_transaction(self.conn):
                self.conn.execute(_Q["prune_progress"])

        translated(self.path, _progress)
        return total


def _stored(record: OutboxRecord) -> bytes:
    """The record's key as the bytes stored (see _decode_tolerantly)."""
    return record.idempotency_key.encode(errors="surrogateescape")


def _decode_tolerantly(data: bytes) -> str:
    return data.decode(errors="surrogateescape")


def _decode_for_display(data: bytes) -> str:
    return data.decode(errors="backslashreplace")


def _is_utf8(row: Sequence[Any]) -> bool:
    try:
        for value in row:
            if isinstance(value, str):
                value.encode()
    except UnicodeEncodeError:
        return False
    return True


def list_records(
    conn: sqlite3.Connection, *, failed_only: bool, limit: int
) -> list[dict[str, Any]]:
    states = ["dead"] if failed_only else ["pending", "dead"]
    factory = conn.text_factory
    conn.text_factory = _decode_for_display  # a writer's non-UTF-8 text must still list
    try:
        cursor = conn.execute(_Q["list_outbox"], {"states": json.dumps(states), "limit": limit})
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor]
    finally:
        conn.text_factory = factory


def replay(conn: sqlite3.Connection, ids: Sequence[int] | None) -> int:
    """Dead records back to pending: attempts and next attempt reset, errors kept."""
    now = format_timestamp(utc_now())
    with write_transaction(conn):
        if ids is None:
            return conn.execute(_Q["replay_all"], {"now": now}).rowcount
        return conn.execute(_Q["replay"], {"ids": json.dumps(list(ids)), "now": now}).rowcount
