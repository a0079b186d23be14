"""Outbox records as a writer of the plain-INSERT contract (docs/schema.md) writes them."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any

from acode_sync.outbox import Failure, FailureResult, Outbox, OutboxRecord
from acode_sync.postgres import PreparedRecord
from acode_sync.retry import RecordRetryPolicy
from acode_sync.workspace import database_path

SESSION_VERSION = "2026-12-01T00:00:00.000000Z"


def prepared_session(n: int, version: str = SESSION_VERSION) -> PreparedRecord:
    """Session sess_<n> at `version`, prepared for shipping as sync.prepare makes it."""
    payload = b'{"title": "t"}'
    sid = f"sess_{n}"
    return PreparedRecord(
        n, f"Session:{sid}:{version}", "Session", sid, sid, payload, version, None,
        hashlib.sha256(payload).digest(),
    )  # fmt: skip


CONTRACT_INSERT = (
    "INSERT INTO outbox (idempotency_key, entity_type, entity_id, session_id, payload,"
    " created_at) VALUES (?, ?, ?, ?, ?, ?)"
)


def run_sql(workspace: Path, sql: str, params: Any = ()) -> list[Any]:
    """One statement on the workspace database, run and committed as an outside reader or
    writer runs it (stdlib sqlite3, no busy handling of ours); its rows."""
    conn = sqlite3.connect(database_path(workspace))
    try:
        rows = conn.execute(sql, params).fetchall()
        conn.commit()
        return rows
    finally:
        conn.close()


def enqueue_raw(
    conn: sqlite3.Connection,
    key: str,
    entity_type: str,
    entity_id: str,
    session_id: str | None,
    payload: str,
    created_at: str,
) -> int:
    """The documented plain INSERT (the caller commits). The new outbox_id is read back
    by its key: `outbox` is a view, so last_insert_rowid() does not give it."""
    conn.execute(CONTRACT_INSERT, (key, entity_type, entity_id, session_id, payload, created_at))
    (outbox_id,) = conn.execute(
        "SELECT outbox_id FROM outbox WHERE idempotency_key = ?", (key,)
    ).fetchone()
    return int(outbox_id)


def session_payload(session_id: str, stamp: str, **fields: Any) -> dict[str, Any]:
    """A Session's full row, created and updated at `stamp`; `fields` override columns."""
    return {
        "session_id": session_id,
        "state": "CREATED",
        "title": None,
        "metadata": None,
        "created_at": stamp,
        "updated_at": stamp,
        **fields,
    }


def claimed_records(outbox: Outbox, ids: list[int]) -> dict[int, OutboxRecord]:
    """The records as a claim would have returned them, by id, whatever their state."""
    rows = outbox.conn.execute(
        "SELECT r.outbox_id, r.idempotency_key, r.entity_type, r.entity_id, r.session_id, "
        "CAST(r.payload AS BLOB), r.base_updated_at, r.created_at, coalesce(s.attempts, 0), "
        "s.outbox_id IS NOT NULL FROM outbox_records AS r "
        "LEFT JOIN outbox_sync AS s ON s.outbox_id = r.outbox_id "
        "WHERE r.outbox_id IN (SELECT value FROM json_each(?))",
        (json.dumps(ids),),
    ).fetchall()
    return {
        row[0]: OutboxRecord(
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            row[5],
            row[6],
            row[7],
            row[8],
            tracked=bool(row[9]),
        )
        for row in rows
    }


def mark_ids(
    outbox: Outbox,
    processed: list[int],
    failures: list[Failure],
    policy: RecordRetryPolicy,
    **options: Any,
) -> list[FailureResult]:
    """Mark records by id, as the syncer marks the records it claimed."""
    claimed = claimed_records(outbox, [*processed, *(f.outbox_id for f in failures)])
    return outbox.mark(
        [claimed[i] for i in processed], failures, policy, claimed=claimed, **options
    )
