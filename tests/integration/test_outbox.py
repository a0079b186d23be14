"""The syncer's side of the outbox against what writers do between a claim and its mark,
and what the `outbox` view lets a person write. Real SQLite files, no mocks."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Final

import pytest

from acode_sync.outbox import Failure, Outbox
from acode_sync.retry import RecordRetryPolicy
from acode_sync.sql import queries
from acode_sync.store import WorkspaceDatabase
from acode_sync.workspace import DIALECT, database_path
from tests.records import enqueue_raw, session_payload

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


# --- ids given again: re-inserted or gap-filling records are pending -------------------

EXPLICIT_INSERT: Final = (
    "INSERT INTO {table} (outbox_id, idempotency_key, entity_type, entity_id, payload,"
    " created_at) VALUES (?, 'Session:sess_again:' || ?, 'Session', 'sess_again', '{{}}', ?)"
)


def insert_with_id(workspace: Path, outbox_id: int, *, table: str = "outbox") -> None:
    with connect(workspace) as conn:
        conn.execute(EXPLICIT_INSERT.format(table=table), (outbox_id, outbox_id, T0))


def sync_rows(workspace: Path) -> dict[int, str]:
    with connect(workspace) as conn:
        return dict(conn.execute("SELECT outbox_id, state FROM outbox_sync"))


@pytest.mark.parametrize("table", ["outbox", "outbox_records"])
def test_the_last_id_re_inserted_below_the_mark_is_shipped(workspace: Path, table: str) -> None:
    ids = fill_outbox(workspace, 5)
    outbox = Outbox(workspace, busy_timeout=5.0)
    try:
        outbox.mark([], [], RecordRetryPolicy(), through=ids[-1])
        with connect(workspace) as conn:
            conn.execute("DELETE FROM outbox WHERE outbox_id = ?", (ids[-1],))
        insert_with_id(workspace, ids[-1], table=table)  # the largest id ever given, again
        assert states(workspace)[ids[-1]] == "pending/0"
        claimed = outbox.claim(max_records=10, max_bytes=10**9)
        assert [(r.outbox_id, r.tracked) for r in claimed] == [(ids[-1], True)]
    finally:
        outbox.close()


def test_the_last_id_re_inserted_while_its_batch_is_in_flight_is_shipped(
    workspace: Path,
) -> None:
    ids = fill_outbox(workspace, 5)
    outbox = Outbox(workspace, busy_timeout=5.0)
    try:
        claimed = outbox.claim(max_records=10, max_bytes=10**9)
        assert [r.outbox_id for r in claimed] == ids
        # Between the claim and the mark, a writer replaces the batch's last record.
        with connect(workspace) as conn:
            conn.execute("DELETE FROM outbox WHERE outbox_id = ?", (ids[-1],))
        insert_with_id(workspace, ids[-1])
        outbox.mark([], [], RecordRetryPolicy(), through=ids[-1])
        assert states(workspace) == {**dict.fromkeys(ids[:-1], "processed/0"), ids[-1]: "pending/0"}
        assert [r.outbox_id for r in outbox.claim(max_records=10, max_bytes=10**9)] == [ids[-1]]
    finally:
        outbox.close()


def test_an_id_at_or_below_the_mark_is_pending_even_if_the_counter_was_reset(
    workspace: Path,
) -> None:
    ids = fill_outbox(workspace, 3)
    outbox = Outbox(workspace, busy_timeout=5.0)
    try:
        outbox.mark([], [], RecordRetryPolicy(), through=ids[-1])
        with connect(workspace) as conn:  # every record pruned, the counter edited back
            conn.execute("DELETE FROM outbox")
            conn.execute("UPDATE sqlite_sequence SET seq = 0 WHERE name = 'outbox_records'")
            enqueue_raw(conn, f"Session:sess_new:{T0}", "Session", "sess_new", None, "{}", T0)
        assert states(workspace) == {ids[0]: "pending/0"}  # the plain insert got id 1
        assert sync_rows(workspace) == {ids[0]: "pending"}
    finally:
        outbox.close()


def test_plain_inserts_and_ids_above_every_given_one_write_no_sync_row(workspace: Path) -> None:
    ids = fill_outbox(workspace, 3)
    with connect(workspace) as conn:
        enqueue_raw(conn, f"Session:sess_a:{T0}", "Session", "sess_a", None, "{}", T0)
        conn.execute(
            "INSERT INTO outbox_records (idempotency_key, entity_type, entity_id, payload,"
            " created_at) VALUES ('k1', 'Session', 's1', '{}', ?),"
            " ('k2', 'Session', 's2', '{}', ?)",
            (T0, T0),
        )
    insert_with_id(workspace, ids[-1] + 100)
    insert_with_id(workspace, ids[-1] + 50)  # a gap below an id given: pending, tracked
    assert sync_rows(workspace) == {ids[-1] + 50: "pending"}
    assert set(states(workspace).values()) == {"pending/0"}
