"""Migrations 0002 and 0003: the outbox split into outbox_records (written once),
outbox_sync (the narrow rows of records with a sync state of their own) and
outbox_progress (the mark), with `outbox` a view over them. Real SQLite files, no mocks."""

from __future__ import annotations

import json
import sqlite3
import struct
from collections.abc import Iterator
from contextlib import closing, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import pytest

from acode_sync.config import PostgresSettings, SyncSettings
from acode_sync.domain import Session, format_timestamp
from acode_sync.errors import RecordRejectedError
from acode_sync.migrations import load_migrations
from acode_sync.outbox import CLAIM_STATEMENTS, MARK_CHUNK, Failure, Outbox
from acode_sync.postgres import PostgresTarget
from acode_sync.retry import RecordRetryPolicy
from acode_sync.sql import queries
from acode_sync.store import WorkspaceDatabase, outbox_row
from acode_sync.sync import WorkspaceSyncer
from acode_sync.workspace import (
    DIALECT,
    OpenOptions,
    database_path,
    migrate,
    open_workspace,
    schema_version,
)
from tests.records import enqueue_raw, mark_ids, session_payload

SHIPPED: Final = load_migrations(DIALECT)
LATEST: Final = SHIPPED[-1].version
_Q: Final = queries(DIALECT)
FAR_FUTURE: Final = "2099-01-01T00:00:00.000000Z"
PROCESSED_AT: Final = "2025-01-15T10:30:01.000000Z"  # long past any retention
T0: Final = "2026-01-15T10:30:00.000000Z"
# The pages of the records: their table and its two indexes.
RECORD_BTREES: Final = ("outbox_records", "sqlite_autoindex_outbox_records_1", "outbox_by_entity")


def connect(workspace: Path) -> closing[sqlite3.Connection]:
    conn = sqlite3.connect(database_path(workspace), isolation_level=None, timeout=5.0)
    conn.execute("PRAGMA foreign_keys = ON")
    return closing(conn)


def enqueue(conn: sqlite3.Connection, session_id: str, stamp: str, **fields: Any) -> int:
    """The documented plain INSERT of a Session record; its id read back by key."""
    key = f"Session:{session_id}:{stamp}"
    payload = json.dumps(session_payload(session_id, stamp, **fields))
    return enqueue_raw(conn, key, "Session", session_id, session_id, payload, stamp)


def version_1_workspace(workspace: Path) -> sqlite3.Connection:
    """A workspace database as the program of schema version 1 made it."""
    conn = open_workspace(workspace, run_migrations=False)
    assert conn.execute("PRAGMA journal_mode = WAL").fetchone() == ("wal",)
    assert migrate(conn, available=SHIPPED[:1]) == (0, 1)
    assert conn.execute("SELECT type FROM sqlite_master WHERE name = 'outbox'").fetchone() == (
        "table",
    )
    return conn


def add_error(conn: sqlite3.Connection, outbox_id: int, attempt: int) -> None:
    conn.execute(
        "INSERT INTO outbox_errors (outbox_id, attempt, error, created_at) VALUES (?, ?, ?, ?)",
        (outbox_id, attempt, f"error {attempt} of {outbox_id}", T0),
    )


def snapshot(conn: sqlite3.Connection) -> tuple[list[Any], list[Any]]:
    records = conn.execute("SELECT * FROM outbox ORDER BY outbox_id").fetchall()
    errors = conn.execute("SELECT * FROM outbox_errors ORDER BY error_id").fetchall()
    return records, errors


def sequence(conn: sqlite3.Connection) -> list[tuple[str, int]]:
    return conn.execute("SELECT name, seq FROM sqlite_sequence ORDER BY name").fetchall()


@pytest.fixture
def old_workspace(workspace: Path) -> dict[str, int]:
    """Schema version 1 holding one record in each state, errors, and a deleted last id.

    Returns the record ids by name; the counter of ids stands at `deleted`."""
    conn = version_1_workspace(workspace)
    ids: dict[str, int] = {}
    try:
        ids["processed"] = enqueue(conn, "sess_processed", T0)
        conn.execute(
            "UPDATE outbox SET state = 'processed', processed_at = ? WHERE outbox_id = ?",
            (PROCESSED_AT, ids["processed"]),
        )
        ids["dead"] = enqueue(conn, "sess_dead", T0)
        for attempt in range(1, 11):
            add_error(conn, ids["dead"], attempt)
        conn.execute(
            "UPDATE outbox SET state = 'dead', attempts = 10, last_error = 'error 10'"
            " WHERE outbox_id = ?",
            (ids["dead"],),
        )
        ids["retrying"] = enqueue(conn, "sess_retrying", T0)
        add_error(conn, ids["retrying"], 1)
        add_error(conn, ids["retrying"], 2)
        conn.execute(
            "UPDATE outbox SET attempts = 2, next_attempt_at = ?, last_error = 'error 2'"
            " WHERE outbox_id = ?",
            (FAR_FUTURE, ids["retrying"]),
        )
        # A later version of the retrying entity: held back behind it.
        ids["behind"] = enqueue(conn, "sess_retrying", "2026-01-15T10:30:05.000000Z")
        ids["pending"] = enqueue(conn, "sess_pending", T0, title="pending at the upgrade")
        deleted = enqueue(conn, "sess_deleted", T0)
        add_error(conn, deleted, 1)
        conn.execute("DELETE FROM outbox WHERE outbox_id = ?", (deleted,))  # cascades (FK on)
        ids["deleted"] = deleted
        assert sequence(conn) == [("outbox", deleted)]
    finally:
        conn.close()
    return ids


def test_an_old_outbox_is_carried_over_whole(
    workspace: Path, old_workspace: dict[str, int]
) -> None:
    with connect(workspace) as conn:
        before = snapshot(conn)
    assert len(before[0]) == 5
    assert len(before[1]) == 12

    db = WorkspaceDatabase(workspace)  # migrates
    try:
        assert schema_version(db.conn) == LATEST
        assert snapshot(db.conn) == before  # every column, the same order, the same values
        states = {
            row[0]: row[1:]
            for row in db.conn.execute(
                "SELECT outbox_id, state, attempts, processed_at, next_attempt_at, last_error"
                " FROM outbox_sync"
            )
        }
        assert states[old_workspace["processed"]] == (
            "processed",
            0,
            PROCESSED_AT,
            None,
            None,
        )
        assert states[old_workspace["dead"]] == ("dead", 10, None, None, "error 10")
        assert states[old_workspace["retrying"]] == ("pending", 2, None, FAR_FUTURE, "error 2")
        assert states[old_workspace["pending"]] == ("pending", 0, None, None, None)
        assert db.conn.execute(
            "SELECT count(*) FROM outbox_sync AS s JOIN outbox_records AS r USING (outbox_id)"
            " WHERE s.created_at = r.created_at"
        ).fetchone() == (5,)
        assert db.conn.execute("PRAGMA foreign_key_check").fetchall() == []
        assert db.conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        # The errors now hang off outbox_records, and still go with their record.
        fk = db.conn.execute(
            "SELECT [table], on_delete FROM pragma_foreign_key_list('outbox_errors')"
        )
        assert fk.fetchall() == [("outbox_records", "CASCADE")]
        # The id counter came over as it was, above the largest id left.
        assert sequence(db.conn) == [("outbox_records", old_workspace["deleted"])]
        saved = db.save(Session(title="after the upgrade"))
        (new_id,) = db.conn.execute(
            "SELECT outbox_id FROM outbox WHERE entity_id = ?", (saved.session_id,)
        ).fetchone()
        assert new_id == old_workspace["deleted"] + 1
    finally:
        db.close()


@pytest.mark.parametrize("records", [0, 3], ids=["never-used", "all-pruned"])
def test_an_empty_old_outbox_keeps_its_id_counter(workspace: Path, records: int) -> None:
    conn = version_1_workspace(workspace)
    try:
        for i in range(records):
            enqueue(conn, f"sess_{i}", T0)
        conn.execute("DELETE FROM outbox")
    finally:
        conn.close()
    db = WorkspaceDatabase(workspace)
    try:
        # No counter row and a row at 0 mean the same: no id was ever given.
        assert [(n, s) for n, s in sequence(db.conn) if s] == (
            [("outbox_records", records)] if records else []
        )
        assert "outbox" not in dict(sequence(db.conn))
        db.save(Session())
        assert db.conn.execute("SELECT outbox_id FROM outbox").fetchall() == [(records + 1,)]
    finally:
        db.close()


@pytest.mark.anyio
@pytest.mark.postgres
async def test_records_sync_after_the_upgrade(
    workspace: Path, old_workspace: dict[str, int], pg_url: str
) -> None:
    db = WorkspaceDatabase(workspace)
    try:
        saved = db.save(Session(title="after the upgrade"))
    finally:
        db.close()
    target = PostgresTarget(PostgresSettings(dsn=pg_url, connect_timeout=5, statement_timeout=10))
    try:
        summary = await WorkspaceSyncer(
            workspace=workspace, target=target, settings=SyncSettings()
        ).drain()
    finally:
        await target.close()
    assert summary.applied == 2  # the pending record and the new one
    with connect(workspace) as conn:
        rows = dict(
            conn.execute("SELECT outbox_id, state || '/' || attempts FROM outbox").fetchall()
        )
        (new_id,) = conn.execute(
            "SELECT outbox_id FROM outbox WHERE entity_id = ?", (saved.session_id,)
        ).fetchone()
    assert rows == {
        # old_workspace["processed"]: pruned by the drain's maintenance (long processed)
        old_workspace["dead"]: "dead/10",
        old_workspace["retrying"]: "pending/2",  # waits out its backoff
        old_workspace["behind"]: "pending/0",  # held back behind it
        old_workspace["pending"]: "processed/0",
        new_id: "processed/0",
    }


# --- the marks write only narrow rows --------------------------------------------------


def fill_outbox(workspace: Path, count: int) -> list[int]:
    """`count` pending records with ~1 KB payloads, queued in one transaction."""
    db = WorkspaceDatabase(workspace)
    try:
        db.conn.execute("BEGIN IMMEDIATE")
        for i in range(count):
            payload = json.dumps(session_payload(f"sess_{i:06d}", T0, title="x" * 900))
            db.conn.execute(
                _Q["insert_outbox"],
                outbox_row(
                    f"Session:sess_{i:06d}:{T0}",
                    "Session",
                    f"sess_{i:06d}",
                    None,
                    payload,
                    None,
                    T0,
                ),
            )
        db.conn.execute("COMMIT")
        return [int(i) for (i,) in db.conn.execute("SELECT outbox_id FROM outbox_records")]
    finally:
        db.close()


@contextmanager
def empty_wal(workspace: Path) -> Iterator[Path]:
    """The -wal file, checkpointed to empty. It stays on disk while this connection is open
    (the last connection to close would checkpoint and delete it)."""
    with connect(workspace) as keeper:
        keeper.execute("SELECT count(*) FROM outbox_sync").fetchone()
        assert keeper.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
        wal = database_path(workspace).with_name("workspace.db-wal")
        assert wal.stat().st_size == 0
        yield wal


def wal_pages(wal: Path) -> set[int]:
    """The page numbers of every frame in a WAL file (checkpointed to empty beforehand)."""
    data = wal.read_bytes()
    if not data:
        return set()
    (page_size,) = struct.unpack(">I", data[8:12])
    pages = set()
    for offset in range(32, len(data) - 24 - page_size + 1, 24 + page_size):
        (page,) = struct.unpack(">I", data[offset : offset + 4])
        pages.add(page)
    return pages


def record_pages(workspace: Path) -> set[int]:
    with connect(workspace) as conn:
        try:
            rows = conn.execute(
                f"SELECT pageno FROM dbstat WHERE name IN {RECORD_BTREES!r}"
            ).fetchall()
        except sqlite3.OperationalError:
            pytest.skip("this SQLite has no dbstat table")
    return {int(page) for (page,) in rows}


def test_marking_a_thousand_records_moves_the_mark_and_writes_no_record_page(
    workspace: Path,
) -> None:
    ids = fill_outbox(workspace, 1001)
    records = record_pages(workspace)
    assert len(records) > 250  # the payloads: ~1 MB of pages a mark must not rewrite
    now = datetime(2026, 1, 15, 10, 31, tzinfo=UTC)
    with empty_wal(workspace) as wal:
        outbox = Outbox(workspace, busy_timeout=5.0, clock=lambda: now)
        try:
            assert mark_ids(outbox, [], [], RecordRetryPolicy(), through=ids[999]) == []
        finally:
            outbox.close()
        written = wal_pages(wal)
        size = wal.stat().st_size
    assert written
    assert not written & records
    # Before the split this mark rewrote ~300 pages (1.4 MB of WAL); with a sync row per
    # record, ~30 pages. Now: the progress row's page and the database header.
    assert size < 4 * (4096 + 24) + 32, size
    with connect(workspace) as conn:
        assert conn.execute("SELECT state, count(*) FROM outbox GROUP BY state").fetchall() == [
            ("pending", 1),
            ("processed", 1000),
        ]
        stamps = conn.execute(
            "SELECT DISTINCT processed_at, updated_at FROM outbox WHERE state = 'processed'"
        )
        assert stamps.fetchall() == [(format_timestamp(now), format_timestamp(now))]
        assert conn.execute("SELECT count(*) FROM outbox_sync").fetchone() == (0,)


def test_records_with_a_sync_row_are_marked_a_chunk_at_a_time(workspace: Path) -> None:
    ids = fill_outbox(workspace, 1000)
    marks: list[str] = []
    outbox = Outbox(workspace, busy_timeout=5.0)
    try:
        # Held back as the mark passed them: each now has a pending sync row.
        mark_ids(outbox, [], [], RecordRetryPolicy(), held=ids, through=ids[-1])
        outbox.conn.set_trace_callback(marks.append)
        assert mark_ids(outbox, ids, [], RecordRetryPolicy()) == []
    finally:
        outbox.close()
    # One short transaction per chunk, so a save waits for a chunk at most.
    transactions = [sql for sql in marks if sql.startswith("BEGIN")]
    updates = [sql for sql in marks if sql.lstrip().startswith(("--", "UPDATE outbox_sync"))]
    assert len(transactions) == 1000 // MARK_CHUNK
    assert len(updates) == 1000
    with connect(workspace) as conn:
        assert conn.execute(
            "SELECT state, count(*) FROM outbox_sync GROUP BY state"
        ).fetchall() == [("processed", 1000)]


def test_held_and_failed_records_keep_their_state_as_the_mark_passes(workspace: Path) -> None:
    ids = fill_outbox(workspace, 10)
    outbox = Outbox(workspace, busy_timeout=5.0)
    try:
        results = mark_ids(
            outbox,
            [],
            [Failure(ids[2], "refused")],
            RecordRetryPolicy(),
            held=[ids[5]],
            through=ids[7],
        )
        assert [(r.outbox_id, r.attempts, r.dead) for r in results] == [(ids[2], 1, False)]
        # The mark only moves forward.
        mark_ids(outbox, [], [], RecordRetryPolicy(), through=ids[4])
        assert outbox.backlog()[0] == 4  # the failed one, the held one, the last two
    finally:
        outbox.close()
    with connect(workspace) as conn:
        states = dict(conn.execute("SELECT outbox_id, state || '/' || attempts FROM outbox"))
        assert conn.execute("SELECT through_id FROM outbox_progress").fetchall() == [(ids[7],)]
    assert states == {
        **dict.fromkeys(ids[:8], "processed/0"),
        ids[2]: "pending/1",
        ids[5]: "pending/0",
        ids[8]: "pending/0",
        ids[9]: "pending/0",
    }


def test_a_record_inserted_below_the_mark_stays_pending(workspace: Path) -> None:
    ids = fill_outbox(workspace, 5)
    outbox = Outbox(workspace, busy_timeout=5.0)
    try:
        with connect(workspace) as conn:
            conn.execute("DELETE FROM outbox WHERE outbox_id = ?", (ids[1],))
        mark_ids(outbox, [], [], RecordRetryPolicy(), through=ids[-1])
        with connect(workspace) as conn:
            # A writer fills the gap with an explicit id, below the mark.
            conn.execute(
                "INSERT INTO outbox (outbox_id, idempotency_key, entity_type, entity_id,"
                " payload, created_at) VALUES (?, 'Session:sess_gap:' || ?, 'Session',"
                " 'sess_gap', '{}', ?)",
                (ids[1], T0, T0),
            )
            assert conn.execute(
                "SELECT state FROM outbox WHERE outbox_id = ?", (ids[1],)
            ).fetchone() == ("pending",)
        claimed = outbox.claim(max_records=10, max_bytes=10**9)
        assert [(r.outbox_id, r.tracked) for r in claimed] == [(ids[1], 1)]
    finally:
        outbox.close()


def test_failures_and_state_updates_write_no_record_page(workspace: Path) -> None:
    ids = fill_outbox(workspace, 300)
    records = record_pages(workspace)
    with empty_wal(workspace) as wal:
        outbox = Outbox(workspace, busy_timeout=5.0)
        try:
            failures = [Failure(i, "refused") for i in ids[:100]]
            results = mark_ids(outbox, ids[100:200], failures, RecordRetryPolicy())
            assert {(r.attempts, r.dead) for r in results} == {(1, False)}
        finally:
            outbox.close()
        with connect(workspace) as conn:
            conn.execute("UPDATE outbox SET state = 'dead' WHERE outbox_id > ?", (ids[199],))
            assert conn.execute("SELECT count(*) FROM outbox_errors").fetchone() == (100,)
        written = wal_pages(wal)
    assert written
    assert not written & records


# --- the view: INSERT, UPDATE and DELETE as on the old table ---------------------------


def test_the_plain_insert_takes_the_defaults_and_refuses_a_duplicate_key(
    workspace: Path,
) -> None:
    WorkspaceDatabase(workspace).close()
    with connect(workspace) as conn:
        outbox_id = enqueue(conn, "sess_a", T0)
        row = conn.execute(
            "SELECT state, attempts, processed_at, next_attempt_at, last_error, updated_at,"
            " base_updated_at FROM outbox WHERE outbox_id = ?",
            (outbox_id,),
        ).fetchone()
        assert row == ("pending", 0, None, None, None, None, None)
        # A plain insert writes the record alone: it is pending past the mark.
        assert conn.execute("SELECT count(*) FROM outbox_sync").fetchone() == (0,)
        with pytest.raises(sqlite3.IntegrityError, match="UNIQUE") as info:
            enqueue(conn, "sess_a", T0)
        assert info.value.sqlite_errorname == "SQLITE_CONSTRAINT_UNIQUE"
        assert conn.execute("SELECT count(*) FROM outbox_records").fetchone() == (1,)
        assert conn.execute("SELECT count(*) FROM outbox_sync").fetchone() == (0,)
        # The failed INSERT left nothing half-written: the next one gets the next id.
        assert enqueue(conn, "sess_b", T0) == outbox_id + 1


def test_the_store_refuses_a_save_whose_key_is_already_queued(workspace: Path) -> None:
    now = datetime(2026, 1, 15, 10, 30, tzinfo=UTC)
    db = WorkspaceDatabase(workspace, OpenOptions(clock=lambda: now))
    try:
        session = db.save(Session(title="first"))
        # Another writer queued the version the store's next save of it will get.
        taken = format_timestamp(now + timedelta(microseconds=1))
        with connect(workspace) as conn:
            enqueue(conn, session.session_id, taken)
        with pytest.raises(RecordRejectedError) as info:
            db.save(Session(session_id=session.session_id, title="second"))
        assert info.value.code == "ACODE-DB-006"
        assert "UNIQUE" in info.value.message
        stored = db.get(Session, session.session_id)
        assert stored is not None
        assert stored.title == "first"  # the entity row went back with its record
    finally:
        db.close()


def test_updates_through_the_view_reach_the_right_table(workspace: Path) -> None:
    WorkspaceDatabase(workspace).close()
    with connect(workspace) as conn:
        first = enqueue(conn, "sess_a", T0)
        second = enqueue(conn, "sess_b", T0)
        changes = conn.total_changes
        conn.execute(
            "UPDATE outbox SET state = 'dead', attempts = 3, last_error = 'e' WHERE outbox_id = ?",
            (first,),
        )
        # Only the sync row changed: the record row was not rewritten.
        assert conn.total_changes - changes == 1
        assert conn.execute(
            "SELECT state, attempts, last_error FROM outbox_sync WHERE outbox_id = ?", (first,)
        ).fetchone() == ("dead", 3, "e")
        changes = conn.total_changes
        conn.execute("UPDATE outbox SET payload = '{}' WHERE outbox_id = ?", (second,))
        # The record row, and a pending sync row of its own (a batch in flight that
        # claimed it before the edit must not take it for shipped).
        assert conn.total_changes - changes == 2
        assert conn.execute(
            "SELECT state FROM outbox_sync WHERE outbox_id = ?", (second,)
        ).fetchone() == ("pending",)
        assert conn.execute(
            "SELECT payload FROM outbox_records WHERE outbox_id = ?", (second,)
        ).fetchone() == ("{}",)
        conn.execute("UPDATE outbox SET state = 'processed'")
        assert conn.execute("SELECT DISTINCT state FROM outbox_sync").fetchall() == [("processed",)]
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            conn.execute("UPDATE outbox SET state = 'lost'")
        with pytest.raises(sqlite3.IntegrityError, match="outbox_id cannot change"):
            conn.execute("UPDATE outbox SET outbox_id = 99 WHERE outbox_id = ?", (first,))


@pytest.mark.parametrize("foreign_keys", ["ON", "OFF"])
def test_deletes_through_the_view_take_the_sync_row_and_errors(
    workspace: Path, foreign_keys: str
) -> None:
    WorkspaceDatabase(workspace).close()
    with connect(workspace) as conn:
        conn.execute(f"PRAGMA foreign_keys = {foreign_keys}")
        kept = enqueue(conn, "sess_kept", T0)
        gone = [enqueue(conn, f"sess_{i}", T0) for i in range(3)]
        for outbox_id in [kept, *gone]:
            add_error(conn, outbox_id, 1)
            conn.execute("UPDATE outbox SET attempts = 1 WHERE outbox_id = ?", (outbox_id,))
        conn.execute("DELETE FROM outbox WHERE outbox_id <> ?", (kept,))
        for table in ("outbox_records", "outbox_sync", "outbox_errors"):
            assert conn.execute(f"SELECT outbox_id FROM {table}").fetchall() == [(kept,)], table
        conn.execute("DELETE FROM outbox")
        assert conn.execute("SELECT count(*) FROM outbox_errors").fetchone() == (0,)
        assert enqueue(conn, "sess_next", T0) == gone[-1] + 1  # ids are never reused


def test_prune_deletes_records_with_their_sync_rows_and_errors(workspace: Path) -> None:
    ids = fill_outbox(workspace, 1200)
    with connect(workspace) as conn:
        for outbox_id in ids[:10]:
            add_error(conn, outbox_id, 1)
    clock_now = datetime.now(UTC)
    outbox = Outbox(workspace, busy_timeout=5.0, clock=lambda: clock_now)
    try:
        # Ten records with a sync row of their own (they failed once), then shipped; the
        # rest shipped in batches of 100 as the mark moved past them.
        mark_ids(outbox, [], [Failure(i, "refused") for i in ids[:10]], RecordRetryPolicy())
        mark_ids(outbox, ids[:10], [], RecordRetryPolicy())
        for end in range(100, 1101, 100):
            mark_ids(outbox, [], [], RecordRetryPolicy(), through=ids[end - 1])
        assert outbox.prune(timedelta(days=1)) == 0  # too recent
        later = clock_now + timedelta(days=2)
        outbox.clock = lambda: later
        assert outbox.prune(timedelta(days=1)) == 1100  # in chunks of PRUNE_CHUNK
        assert outbox.backlog()[0] == 100
    finally:
        outbox.close()
    with connect(workspace) as conn:
        assert conn.execute("SELECT min(outbox_id), count(*) FROM outbox_records").fetchone() == (
            ids[1100],
            100,
        )
        assert conn.execute("SELECT count(*) FROM outbox_sync").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM outbox_errors").fetchone() == (0,)
        # The progress rows went with their records, all but the mark itself.
        assert conn.execute("SELECT through_id FROM outbox_progress").fetchall() == [(ids[1099],)]
        assert conn.execute("SELECT count(*) FROM outbox WHERE state = 'pending'").fetchone() == (
            100,
        )


# --- the syncer's queries read the narrow table's partial indexes ----------------------


def test_no_syncer_query_scans_the_processed_records(workspace: Path) -> None:
    ids = fill_outbox(workspace, 2000)
    outbox = Outbox(workspace, busy_timeout=5.0)
    try:
        mark_ids(outbox, [], [], RecordRetryPolicy(), through=ids[1899])
        mark_ids(outbox, [], [Failure(ids[1950], "refused")], RecordRetryPolicy())
        params = {
            "key": "k",
            "payload": b"{}",
            "now": T0,
            "after": 0,
            "with_blocked": 1,
            "through": 1,
            "limit": 100,
            "ids": "[1]",
            "states": '["pending", "dead"]',
            "before": T0,
            "outbox_id": 1,
            "error": "e",
            "max_attempts": 10,
            "next_attempt_at": T0,
        }
        for name in (
            "claim_tracked",
            "claim_past_mark",
            "claim_payloads",
            "mark_processed",
            "mark_failed",
            "record_attempts",
            "replay",
            "replay_all",
            "list_outbox",
            "backlog",
            "outbox_counts",
            "oldest_pending",
            "prune_processed",
            "prune_passed",
            "prune_progress",
            "track_pending",
            "advance_mark",
        ):
            sql = CLAIM_STATEMENTS.get(name, _Q[name])
            args: Any = (1,) if "?" in sql else params
            plan = [row[3] for row in outbox.conn.execute(f"EXPLAIN QUERY PLAN {sql}", args)]
            scans = [step for step in plan if step.startswith("SCAN") and " USING " not in step]
            # Scans of json_each, of a constant row and of the few rows a subquery or CTE
            # gathered (`c`: the claim's candidates, at most twice :limit) read no table.
            derived = ("json_each", "CONSTANT", "(subquery-", "SCAN past_mark")
            assert [s for s in scans if not any(d in s for d in derived)] == [], (name, plan)
            if name != "prune_progress":  # reads ids in order up to the first unmarked one
                assert not any("outbox_records" in step and "SCAN" in step for step in plan), plan
        claim_plans = {
            name: [row[3] for row in outbox.conn.execute(f"EXPLAIN QUERY PLAN {sql}", params)]
            for name, sql in CLAIM_STATEMENTS.items()
        }
        assert "SEARCH s USING INDEX outbox_pending (outbox_id>?)" in claim_plans["claim_tracked"]
        assert "SEARCH r USING INTEGER PRIMARY KEY (rowid>?)" in claim_plans["claim_past_mark"]
        for plan in claim_plans.values():
            assert "SEARCH w USING INDEX outbox_waiting (next_attempt_at>?)" in plan
            assert "USE TEMP B-TREE FOR ORDER BY" not in plan  # read in order, up to :limit
        # The claim itself: the 99 records left pending, not the one waiting out a backoff.
        claimed = outbox.claim(max_records=1000, max_bytes=10**9)
        assert [r.outbox_id for r in claimed] == [i for i in ids[1900:] if i != ids[1950]]
    finally:
        outbox.close()


def test_a_schema_3_outbox_keeps_every_state_and_is_made_consistent(workspace: Path) -> None:
    conn = open_workspace(workspace, run_migrations=False)
    try:
        assert migrate(conn, available=SHIPPED[:3]) == (0, 3)
    finally:
        conn.close()
    ids = fill_outbox_at(workspace, 6)
    with connect(workspace) as conn:
        conn.execute("INSERT INTO outbox_progress VALUES (?, ?, ?, NULL)", (ids[3], T0, T0))
        conn.execute(
            "UPDATE outbox SET state = 'dead', attempts = 10 WHERE outbox_id = ?", (ids[4],)
        )
        # What the view of schema 3 let a person write: contradictions.
        conn.execute("UPDATE outbox SET processed_at = NULL WHERE outbox_id = ?", (ids[0],))
        conn.execute("UPDATE outbox SET state = 'pending' WHERE outbox_id = ?", (ids[1],))
        before = conn.execute("SELECT outbox_id, state, attempts FROM outbox").fetchall()
        assert conn.execute(
            "SELECT count(*) FROM outbox WHERE (state = 'processed') <> (processed_at IS NOT NULL)"
        ).fetchone() == (2,)
    db = WorkspaceDatabase(workspace)  # migrates to the latest version
    try:
        assert schema_version(db.conn) == LATEST
        assert db.conn.execute("SELECT outbox_id, state, attempts FROM outbox").fetchall() == before
        assert db.conn.execute(
            "SELECT outbox_id, state, processed_at FROM outbox ORDER BY outbox_id"
        ).fetchall() == [
            (ids[0], "processed", T0),  # its updated_at: when the mark passed it
            (ids[1], "pending", None),
            (ids[2], "processed", T0),
            (ids[3], "processed", T0),
            (ids[4], "dead", None),
            (ids[5], "pending", None),
        ]
        assert db.conn.execute("PRAGMA foreign_key_check").fetchall() == []
        assert db.conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        db.close()
    outbox = Outbox(workspace, busy_timeout=5.0)
    try:
        claimed = outbox.claim(max_records=10, max_bytes=10**9)
        assert [r.outbox_id for r in claimed] == [ids[1], ids[5]]
    finally:
        outbox.close()


def fill_outbox_at(workspace: Path, count: int) -> list[int]:
    """`count` plain-INSERT records, written without migrating the workspace."""
    with connect(workspace) as conn:
        for i in range(count):
            enqueue(conn, f"sess_{i:06d}", T0)
        return [int(i) for (i,) in conn.execute("SELECT outbox_id FROM outbox_records")]
