"""The syncer's side of the outbox against what writers do between a claim and its mark,
and what the `outbox` view lets a person write. Real SQLite files, no mocks."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Final

from acode_sync.outbox import Failure, Outbox
from acode_sync.retry import RecordRetryPolicy
from acode_sync.sql import queries
from acode_sync.store import WorkspaceDatabase
from acode_sync.workspace import DIALECT, database_path
from tests.records import session_payload

_Q: Final = queries(DIALECT)
T0: Final = "2026-01-15T10:30:00.000000Z"


def connect(workspace: Path) -> closing[sqlite3.Connection]:
    conn = sqlite3.connect(database_path(workspace), isolation_level=None, timeout=5.0)
    conn.execute("PRAGMA foreign_keys = ON")
    return closing(conn)


def fill_outbox(workspace: Path, count: int, *, payload_bytes: int = 900) -> list[int]:
    """`count` pending Session records, queued as the store queues them, in one transaction."""
    db = WorkspaceDatabase(workspace)
    try:
        db.conn.execute("BEGIN IMMEDIATE")
        for i in range(count):
            session_id = f"sess_{i:06d}"
            payload = json.dumps(session_payload(session_id, T0, title="x" * payload_bytes))
            key = f"Session:{session_id}:{T0}"
            db.conn.execute(
                _Q["insert_outbox"], (key, "Session", session_id, session_id, payload, None, T0)
            )
        db.conn.execute("COMMIT")
        return [int(i) for (i,) in db.conn.execute("SELECT outbox_id FROM outbox_records")]
    finally:
        db.close()


def states(workspace: Path) -> dict[int, str]:
    with connect(workspace) as conn:
        rows = conn.execute("SELECT outbox_id, state || '/' || attempts FROM outbox")
        return {int(i): str(s) for i, s in rows}


# --- a record deleted or changed between claim and mark --------------------------------


def test_records_deleted_between_claim_and_mark_are_skipped_by_the_mark(
    workspace: Path,
) -> None:
    ids = fill_outbox(workspace, 8)
    outbox = Outbox(workspace, busy_timeout=5.0)
    try:
        # ids[0] and ids[1] have sync rows of their own (they failed once).
        outbox.mark(
            [], [Failure(ids[0], "refused"), Failure(ids[1], "refused")], RecordRetryPolicy()
        )
        with connect(workspace) as conn:
            conn.execute("UPDATE outbox SET next_attempt_at = NULL")
        claimed = outbox.claim(max_records=10, max_bytes=10**9)
        assert [r.outbox_id for r in claimed] == ids
        with connect(workspace) as conn:
            # A writer deletes records of the batch through the view, one of each outcome,
            # and a person turns another failing one into a dead letter.
            for gone in (ids[0], ids[2], ids[3], ids[7]):
                conn.execute("DELETE FROM outbox WHERE outbox_id = ?", (gone,))
            conn.execute("UPDATE outbox SET state = 'dead' WHERE outbox_id = ?", (ids[4],))
        results = outbox.mark(
            [ids[0], ids[1]],  # shipped, with sync rows (ids[0] is gone)
            [Failure(ids[2], "refused"), Failure(ids[4], "refused"), Failure(ids[5], "refused")],
            RecordRetryPolicy(),
            held=[ids[3], ids[6]],
            through=ids[7],  # the batch's last record, gone too
        )
        assert [(r.outbox_id, r.attempts, r.dead) for r in results] == [(ids[5], 1, False)]
        assert outbox.backlog()[0] == 2  # the failed one and the held one
    finally:
        outbox.close()
    assert states(workspace) == {
        ids[1]: "processed/1",
        ids[4]: "dead/0",
        ids[5]: "pending/1",
        ids[6]: "pending/0",
    }
    with connect(workspace) as conn:
        assert conn.execute("SELECT max(through_id) FROM outbox_progress").fetchone() == (ids[7],)
        assert conn.execute("SELECT outbox_id FROM outbox_errors ORDER BY error_id").fetchall() == [
            (ids[1],),
            (ids[5],),
        ]
