"""docs/schema.md's outbox INSERT works, as written, from the stdlib sqlite3 module."""

from __future__ import annotations

import json
import re
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

from acode_sync.domain import Session, SessionState, format_timestamp, idempotency_key, new_id
from acode_sync.store import WorkspaceDatabase
from acode_sync.workspace import database_path

SCHEMA_DOC = Path(__file__).resolve().parents[2] / "docs" / "schema.md"
_CONTRACT_INSERT = re.compile(r"<!-- contract-insert -->\n```sql\n(.*?)```", re.DOTALL)
CONTRACT_COLUMNS = [
    "idempotency_key",
    "entity_type",
    "entity_id",
    "session_id",
    "payload",
    "created_at",
]


def contract_insert() -> str:
    blocks = _CONTRACT_INSERT.findall(SCHEMA_DOC.read_text())
    assert len(blocks) == 1, "docs/schema.md needs one ```sql block after <!-- contract-insert -->"
    return str(blocks[0]).strip()


def test_the_documented_insert_names_only_the_six_contract_columns() -> None:
    match = re.fullmatch(
        r"INSERT INTO outbox \(([^)]*)\)\s+VALUES \(([^)]*)\);", contract_insert(), re.DOTALL
    )
    assert match is not None
    assert [c.strip() for c in match[1].split(",")] == CONTRACT_COLUMNS
    assert [v.strip() for v in match[2].split(",")] == ["?"] * len(CONTRACT_COLUMNS)


def test_a_plain_sqlite3_writer_enqueues_with_the_documented_insert(workspace: Path) -> None:
    database = WorkspaceDatabase(workspace)
    try:
        earlier = database.save(Session(title="saved through the API"))
    finally:
        database.close()

    stamp = format_timestamp(datetime.now(UTC) + timedelta(seconds=1))
    session_id = new_id("sess")
    row = {
        "session_id": session_id,
        "created_at": stamp,
        "updated_at": stamp,
        "state": "CREATED",
        "title": "saved by another writer",
        "metadata": {"writer": "sqlite3"},
    }
    conn = sqlite3.connect(database_path(workspace), isolation_level=None, timeout=5.0)
    try:
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = FULL")
        previous_max = conn.execute("SELECT max(outbox_id) FROM outbox").fetchone()[0]
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT INTO sessions (session_id, state, title, metadata, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (session_id, "CREATED", row["title"], json.dumps(row["metadata"]), stamp, stamp),
        )
        key = idempotency_key("Session", session_id, stamp)
        conn.execute(
            contract_insert(), (key, "Session", session_id, session_id, json.dumps(row), stamp)
        )
        conn.execute("COMMIT")
        # As documented: the new outbox_id is read back by the key (`outbox` is a view, so
        # last_insert_rowid() does not report it).
        (outbox_id,) = conn.execute(
            "SELECT outbox_id FROM outbox WHERE idempotency_key = ?", (key,)
        ).fetchone()
        record = conn.execute(
            "SELECT state, attempts, processed_at, base_updated_at, next_attempt_at,"
            " last_error, payload FROM outbox WHERE outbox_id = ?",
            (outbox_id,),
        ).fetchone()
    finally:
        conn.close()

    assert previous_max is not None
    assert outbox_id is not None
    assert outbox_id > previous_max
    state, attempts, processed_at, base_updated_at, next_attempt_at, last_error, payload = record
    assert (state, attempts, processed_at) == ("pending", 0, None)
    assert (base_updated_at, next_attempt_at, last_error) == (None, None, None)
    assert json.loads(payload) == row

    database = WorkspaceDatabase(workspace)
    try:
        stored = database.get(Session, session_id)
        page = database.list_sessions()
    finally:
        database.close()
    assert stored is not None
    assert stored.state is SessionState.CREATED
    assert stored.metadata == {"writer": "sqlite3"}
    assert [s.session_id for s in page.items] == [session_id, earlier.session_id]
