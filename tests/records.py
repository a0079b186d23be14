"""Outbox records as a writer of the plain-INSERT contract (docs/schema.md) writes them."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from acode_sync.workspace import database_path

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
