"""The syncer's side of the outbox against what writers do between a claim and its mark,
and what the `outbox` view lets a person write. Real SQLite files, no mocks."""

from __future__ import annotations

import json
import re
import sqlite3
import tracemalloc
from contextlib import closing
from pathlib import Path
from typing import Final

import asyncpg
import pytest

from acode_sync.config import PostgresSettings, SyncSettings
from acode_sync.domain import Session
from acode_sync.outbox import Failure, Outbox
from acode_sync.postgres import PostgresTarget
from acode_sync.retry import RecordRetryPolicy
from acode_sync.sql import queries
from acode_sync.store import WorkspaceDatabase, outbox_row
from acode_sync.sync import WorkspaceSyncer
from acode_sync.workspace import DIALECT, database_path
from tests.records import enqueue_raw, mark_ids, session_payload

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
                _Q["insert_outbox"],
                outbox_row(key, "Session", session_id, session_id, payload, None, T0),
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
        mark_ids(
            outbox,
            [],
            [Failure(ids[0], "refused"), Failure(ids[1], "refused")],
            RecordRetryPolicy(),
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
        by_id = {r.outbox_id: r for r in claimed}
        results = outbox.mark(
            [by_id[ids[0]], by_id[ids[1]]],  # shipped, with sync rows (ids[0] is gone)
            [Failure(ids[2], "refused"), Failure(ids[4], "refused"), Failure(ids[5], "refused")],
            RecordRetryPolicy(),
            claimed=by_id,
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
        mark_ids(outbox, [], [], RecordRetryPolicy(), through=ids[-1])
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
        mark_ids(outbox, [], [], RecordRetryPolicy(), through=ids[-1])
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
        mark_ids(outbox, [], [], RecordRetryPolicy(), through=ids[-1])
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


# --- the view's columns never contradict each other ------------------------------------

LATER: Final = "2026-01-16T08:00:00.000000Z"
FAR: Final = "2099-01-01T00:00:00.000000Z"
INCONSISTENT: Final = (
    "SELECT count(*) FROM outbox WHERE (state = 'processed') <> (processed_at IS NOT NULL)"
)


@pytest.fixture
def one_of_each(workspace: Path) -> dict[str, int]:
    """A processed record below the mark (no sync row), one processed after failing twice,
    a dead one and a pending one past the mark."""
    ids = fill_outbox(workspace, 4)
    outbox = Outbox(workspace, busy_timeout=5.0)
    try:
        policy = RecordRetryPolicy(max_attempts=2)
        for failing in ([ids[1], ids[2]], [ids[2]]):
            mark_ids(outbox, [], [Failure(i, "refused") for i in failing], policy)
            with connect(workspace) as conn:
                conn.execute("UPDATE outbox_sync SET next_attempt_at = NULL")
        mark_ids(outbox, [ids[1]], [], policy, through=ids[2])
    finally:
        outbox.close()
    named = dict(zip(["processed", "retried", "dead", "pending"], ids, strict=True))
    assert states(workspace) == {
        named["processed"]: "processed/0",
        named["retried"]: "processed/1",
        named["dead"]: "dead/2",
        named["pending"]: "pending/0",
    }
    return named


def row(workspace: Path, outbox_id: int) -> tuple[str, str | None, int, str | None]:
    with connect(workspace) as conn:
        found = conn.execute(
            "SELECT state, processed_at, attempts, next_attempt_at FROM outbox WHERE outbox_id = ?",
            (outbox_id,),
        ).fetchone()
        assert conn.execute(INCONSISTENT).fetchone() == (0,)
    return found  # type: ignore[no-any-return]


def update(workspace: Path, assignments: str, outbox_id: int) -> None:
    with connect(workspace) as conn:
        conn.execute(f"UPDATE outbox SET {assignments} WHERE outbox_id = ?", (outbox_id,))


@pytest.mark.parametrize(
    ("name", "assignments", "expected"),
    [
        # Re-queued: pending again, attempts start over.
        ("processed", "processed_at = NULL", ("pending", None, 0, None)),
        ("retried", "processed_at = NULL", ("pending", None, 0, None)),
        ("processed", "state = 'pending'", ("pending", None, 0, None)),
        ("retried", "state = 'pending'", ("pending", None, 0, None)),
        ("dead", "state = 'pending'", ("pending", None, 0, None)),
        ("dead", "state = 'pending', attempts = 1", ("pending", None, 1, None)),
        ("dead", f"state = 'pending', next_attempt_at = '{FAR}'", ("pending", None, 0, FAR)),
        # Processed: at the time given, or now.
        ("pending", "state = 'processed'", ("processed", "now", 0, None)),
        ("dead", f"state = 'processed', processed_at = '{LATER}'", ("processed", LATER, 2, None)),
        ("processed", f"processed_at = '{LATER}'", ("processed", LATER, 0, None)),
        # Any other state has no processed_at.
        ("processed", "state = 'dead'", ("dead", None, 0, None)),
        ("retried", "state = 'dead', attempts = 10", ("dead", None, 10, None)),
        # Columns that do not touch the state.
        ("pending", "attempts = 3", ("pending", None, 3, None)),
        ("processed", "last_error = 'noted'", ("processed", "kept", 0, None)),
    ],
)
def test_an_update_through_the_view_means_what_it_says(
    workspace: Path,
    one_of_each: dict[str, int],
    name: str,
    assignments: str,
    expected: tuple[str, str | None, int, str | None],
) -> None:
    outbox_id = one_of_each[name]
    before = row(workspace, outbox_id)
    update(workspace, assignments, outbox_id)
    state, processed_at, attempts, next_attempt_at = row(workspace, outbox_id)
    if expected[1] == "now":
        assert processed_at is not None
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", processed_at)
        expected = (expected[0], processed_at, *expected[2:])
    elif expected[1] == "kept":
        expected = (expected[0], before[1], *expected[2:])
    assert (state, processed_at, attempts, next_attempt_at) == expected
    with closing(Outbox(workspace, busy_timeout=5.0)) as outbox:
        claimed = {r.outbox_id for r in outbox.claim(max_records=10, max_bytes=10**9)}
    assert (outbox_id in claimed) == (state == "pending" and next_attempt_at is None)


@pytest.mark.parametrize(
    ("name", "assignments"),
    [
        ("pending", f"processed_at = '{LATER}'"),
        ("dead", f"processed_at = '{LATER}'"),
        ("processed", f"state = 'dead', processed_at = '{LATER}'"),
        ("processed", f"state = 'pending', processed_at = '{LATER}'"),
    ],
)
def test_a_processed_at_without_state_processed_is_refused(
    workspace: Path, one_of_each: dict[str, int], name: str, assignments: str
) -> None:
    before = states(workspace)
    with pytest.raises(sqlite3.IntegrityError, match="processed_at is set only with state"):
        update(workspace, assignments, one_of_each[name])
    assert states(workspace) == before


def test_inserts_through_the_view_keep_state_and_processed_at_together(workspace: Path) -> None:
    WorkspaceDatabase(workspace).close()
    insert = (
        "INSERT INTO outbox (idempotency_key, entity_type, entity_id, payload, created_at, {})"
        " VALUES (?, 'Session', 'sess_a', '{{}}', ?, {})"
    )
    with connect(workspace) as conn:
        conn.execute(insert.format("state", "'processed'"), ("k1", T0))
        conn.execute(insert.format("state, processed_at", f"'processed', '{LATER}'"), ("k2", T0))
        with pytest.raises(sqlite3.IntegrityError, match="processed_at is set only with state"):
            conn.execute(insert.format("processed_at", f"'{LATER}'"), ("k3", T0))
        with pytest.raises(sqlite3.IntegrityError, match="processed_at is set only with state"):
            conn.execute(insert.format("state, processed_at", f"'dead', '{LATER}'"), ("k4", T0))
        # The table itself refuses what the view would not write.
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            conn.execute("UPDATE outbox_sync SET processed_at = NULL")
        rows = conn.execute("SELECT idempotency_key, state, processed_at FROM outbox").fetchall()
        assert conn.execute(INCONSISTENT).fetchone() == (0,)
    assert [(k, s) for k, s, _ in rows] == [("k1", "processed"), ("k2", "processed")]
    assert rows[1][2] == LATER


@pytest.mark.anyio
@pytest.mark.postgres
@pytest.mark.parametrize("assignments", ["state = 'pending'", "processed_at = NULL"])
async def test_a_record_re_queued_through_the_view_is_shipped_again(
    workspace: Path, pg_url: str, assignments: str
) -> None:
    db = WorkspaceDatabase(workspace)
    try:
        sessions = [db.save(Session(title=f"session {i}")) for i in range(3)]
    finally:
        db.close()
    lost = sessions[1].session_id
    target = PostgresTarget(PostgresSettings(dsn=pg_url, connect_timeout=5, statement_timeout=10))
    try:
        syncer = WorkspaceSyncer(workspace=workspace, target=target, settings=SyncSettings())
        assert (await syncer.drain()).applied == 3
        # The central copy loses a session; a person re-queues its record, processed below
        # the mark (it has no sync row).
        conn = await asyncpg.connect(pg_url, server_settings={"search_path": "acode"})
        try:
            await conn.execute("DELETE FROM sessions WHERE session_id = $1", lost)
            await conn.execute(
                "DELETE FROM applied_keys WHERE idempotency_key LIKE $1", f"%{lost}%"
            )
        finally:
            await conn.close()
        with connect(workspace) as sqlite_conn:
            (outbox_id,) = sqlite_conn.execute(
                "SELECT outbox_id FROM outbox WHERE entity_id = ?", (lost,)
            ).fetchone()
        assert sync_rows(workspace) == {}
        update(workspace, assignments, outbox_id)
        assert row(workspace, outbox_id) == ("pending", None, 0, None)
        summary = await WorkspaceSyncer(
            workspace=workspace, target=target, settings=SyncSettings()
        ).drain()
        assert (summary.applied, summary.duplicates, summary.backlog) == (1, 0, 0)
    finally:
        await target.close()
    conn = await asyncpg.connect(pg_url, server_settings={"search_path": "acode"})
    try:
        titles = await conn.fetch("SELECT session_id, title FROM sessions ORDER BY title")
    finally:
        await conn.close()
    assert [tuple(r) for r in titles] == [(s.session_id, s.title) for s in sessions]
    state, processed_at, attempts, _ = row(workspace, outbox_id)
    assert (state, attempts) == ("processed", 0)
    assert processed_at is not None


# --- a claim reads about one batch of payload (X-013) ----------------------------------

MIB: Final = 1 << 20


def test_a_claim_reads_one_batch_of_payload_whatever_the_backlog(workspace: Path) -> None:
    """48 records of 1 MiB, batches of 4 MiB: the payload bytes a claim brings into Python
    (traced by tracemalloc, the driver's own allocations) stay near one batch."""
    ids = fill_outbox(workspace, 48, payload_bytes=MIB)
    outbox = Outbox(workspace, busy_timeout=5.0)
    try:
        outbox.claim(max_records=1, max_bytes=1)  # warm: statements compiled, pages cached
        tracemalloc.start()
        try:
            claimed = outbox.claim(max_records=1000, max_bytes=4 * MIB, with_blocked=True)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # Each payload is a little over 1 MiB: three fit in 4 MiB, the fourth is read.
        assert [r.outbox_id for r in claimed] == ids[:3]
        assert peak < 6 * MIB, peak  # was 48 MiB and more: every candidate's payload
        # A record larger than the batch still makes a batch on its own.
        alone = outbox.claim(max_records=1000, max_bytes=MIB)
        assert [r.outbox_id for r in alone] == ids[:1]
        assert len(alone[0].payload) > MIB
    finally:
        outbox.close()
