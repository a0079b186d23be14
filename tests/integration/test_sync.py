from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest

from acode_sync.config import PostgresSettings, SyncSettings
from acode_sync.domain import Session, SessionState, SessionTask, format_timestamp
from acode_sync.errors import (
    BusyError,
    MigrationError,
    PostgresSchemaMismatchError,
    PostgresUnavailableError,
    SchemaMismatchError,
    WorkspaceOpenError,
)
from acode_sync.migrations import latest_version, load_migrations, parse_migrations
from acode_sync.outbox import list_records
from acode_sync.postgres import PostgresTarget
from acode_sync.store import WorkspaceDatabase
from acode_sync.sync import SyncLock, WorkspaceSyncer
from acode_sync.workspace import OpenOptions, database_path
from tests.pg import (
    APPLIED_VERSION_KEYS,
    COUNT_APPLIED_VERSIONS,
    create_database_async,
    database_url,
    drop_database_async,
)
from tests.records import enqueue_raw, run_sql, session_payload

PG_LATEST = latest_version(load_migrations("postgres"))

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]


@pytest.fixture
async def target(pg_url: str) -> AsyncIterator[PostgresTarget]:
    target = PostgresTarget(PostgresSettings(dsn=pg_url, connect_timeout=5, statement_timeout=10))
    yield target
    await target.close()


async def fetch(pg_url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(pg_url, server_settings={"search_path": "acode"})
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


def outbox_states(workspace: Path) -> list[tuple[str, int]]:
    return run_sql(workspace, "SELECT state, attempts FROM outbox ORDER BY outbox_id")


def clone_workspace(source: Path, destination: Path) -> None:
    """A copy of a workspace with its own origin: another machine with the same history."""
    shutil.copytree(source, destination)
    conn = sqlite3.connect(database_path(destination))
    conn.execute("UPDATE workspace_meta SET value = ? WHERE key = 'origin_id'", (destination.name,))
    conn.execute("UPDATE outbox SET state = 'processed'")
    conn.commit()
    conn.close()


def syncer(workspace: Path, target: PostgresTarget, **settings: Any) -> WorkspaceSyncer:
    return WorkspaceSyncer(workspace=workspace, target=target, settings=SyncSettings(**settings))


async def test_records_reach_postgres_with_typed_columns(
    workspace: Path, target: PostgresTarget, pg_url: str
) -> None:
    db = WorkspaceDatabase(workspace)
    session = db.save(Session(title="fix", metadata={"n": 1}))
    session = db.save(Session(session_id=session.session_id, state=SessionState.PLANNING))
    task = db.save(SessionTask(session_id=session.session_id, title="t"))
    db.close()

    summary = await syncer(workspace, target).drain()

    assert (summary.applied, summary.duplicates, summary.conflicts) == (3, 0, 0)
    rows = await fetch(pg_url, "SELECT * FROM sessions")
    assert len(rows) == 1
    assert rows[0]["state"] == "PLANNING"
    assert rows[0]["metadata"] is None
    assert format_timestamp(rows[0]["updated_at"]) == session.updated_at
    assert rows[0]["origin_id"] == db.origin_id
    tasks = await fetch(pg_url, "SELECT session_id, title FROM session_tasks")
    assert [tuple(r) for r in tasks] == [(session.session_id, "t")]
    keys = await fetch(pg_url, COUNT_APPLIED_VERSIONS)
    assert keys[0][0] == 3
    assert outbox_states(workspace) == [("processed", 0)] * 3
    assert task.task_id


async def test_the_same_batch_twice_has_one_effect(
    workspace: Path, target: PostgresTarget, pg_url: str
) -> None:
    db = WorkspaceDatabase(workspace)
    for _ in range(5):
        db.save(Session())
    db.close()
    first = await syncer(workspace, target).drain()
    run_sql(workspace, "UPDATE outbox SET state = 'pending', processed_at = NULL")
    second = await syncer(workspace, target).drain()
    assert (first.applied, first.duplicates) == (5, 0)
    assert (second.applied, second.duplicates) == (0, 5)
    assert outbox_states(workspace) == [("processed", 0)] * 5
    count = await fetch(pg_url, "SELECT count(*) FROM sessions")
    assert count[0][0] == 5


async def test_several_records_of_one_entity_in_one_batch(
    workspace: Path, target: PostgresTarget, pg_url: str
) -> None:
    db = WorkspaceDatabase(workspace)
    session = db.save(Session())
    for title in ("a", "b", "c", "d"):
        session = db.save(Session(session_id=session.session_id, title=title))
    db.close()
    summary = await syncer(workspace, target).drain()
    assert (summary.applied, summary.conflicts, summary.batches) == (5, 0, 1)
    rows = await fetch(pg_url, "SELECT title, idempotency_key FROM sessions")
    assert [tuple(r) for r in rows] == [("d", f"Session:{session.session_id}:{session.updated_at}")]


async def test_unknown_payload_keys_are_kept(
    workspace: Path, target: PostgresTarget, pg_url: str
) -> None:
    WorkspaceDatabase(workspace).close()
    payload = {
        "session_id": "sess_future",
        "state": "CREATED",
        "created_at": "2026-01-15T10:30:00.000000Z",
        "updated_at": "2026-01-15T10:30:00.000000Z",
        "color": "blue",
    }
    run_sql(
        workspace,
        "INSERT INTO outbox (idempotency_key, entity_type, entity_id, session_id, payload, "
        "created_at) VALUES (?, 'Session', 'sess_future', 'sess_future', ?, ?)",
        (
            "Session:sess_future:2026-01-15T10:30:00.000000Z",
            json.dumps(payload),
            "2026-01-15T10:30:00.000000Z",
        ),
    )
    summary = await syncer(workspace, target).drain()
    assert summary.applied == 1
    rows = await fetch(pg_url, "SELECT extra, idempotency_key FROM sessions")
    assert json.loads(rows[0]["extra"]) == {"color": "blue"}
    assert rows[0]["idempotency_key"] == "Session:sess_future:2026-01-15T10:30:00.000000Z"


async def _conflict_scenario(
    tmp_path: Path, url: str, order: tuple[str, str]
) -> tuple[list[Any], list[Any]]:
    base = tmp_path / f"base-{order[0]}"
    base.mkdir()
    db = WorkspaceDatabase(base)
    session = db.save(Session(session_id="sess_shared", title="v1"))
    db.close()
    target = PostgresTarget(PostgresSettings(dsn=url))
    try:
        await syncer(base, target).drain()
        workspaces = {}
        for name in ("a", "b"):
            workspaces[name] = tmp_path / f"{name}-{order[0]}"
            clone_workspace(base, workspaces[name])
        for name in ("a", "b"):  # b saves last: its updated_at is the newest
            db = WorkspaceDatabase(workspaces[name])
            db.save(Session(session_id=session.session_id, title=f"from {name}"))
            db.close()
        for name in order:
            await syncer(workspaces[name], target).drain()
    finally:
        await target.close()
    sessions = await fetch(url, "SELECT title, origin_id FROM sessions")
    conflicts = await fetch(url, "SELECT * FROM conflicts")
    return [tuple(r) for r in sessions], conflicts


async def test_concurrent_edits_conflict_once_and_converge_in_either_order(
    tmp_path: Path, pg_url: str
) -> None:
    other = await create_database_async()
    try:
        one = await _conflict_scenario(tmp_path, pg_url, ("a", "b"))
        two = await _conflict_scenario(tmp_path, database_url(other), ("b", "a"))
    finally:
        await drop_database_async(other)
    assert [title for title, _ in one[0]] == [title for title, _ in two[0]] == ["from b"]
    for sessions, conflicts in (one, two):
        assert len(conflicts) == 1
        conflict = conflicts[0]
        versions = {
            json.loads(conflict["incoming_version"])["title"],
            json.loads(conflict["current_version"])["title"],
        }
        assert versions == {"from a", "from b"}
        assert conflict["incoming_updated_at"] != conflict["current_updated_at"]
        assert conflict["incoming_origin"] != conflict["current_origin"]
        winner_title = json.loads(conflict[f"{conflict['winner']}_version"])["title"]
        assert winner_title == sessions[0][0] == "from b"


async def test_sequential_saves_of_one_workspace_are_never_conflicts(
    workspace: Path, target: PostgresTarget, pg_url: str
) -> None:
    db = WorkspaceDatabase(workspace)
    session = db.save(Session())
    for n in range(6):
        session = db.save(Session(session_id=session.session_id, title=str(n)))
        await syncer(workspace, target, batch_max_records=2).drain()
    db.close()
    assert (await fetch(pg_url, "SELECT count(*) FROM conflicts"))[0][0] == 0
    assert (await fetch(pg_url, "SELECT title FROM sessions"))[0][0] == "5"


async def test_same_key_different_payload_is_a_tie_conflict(
    tmp_path: Path, target: PostgresTarget, pg_url: str
) -> None:
    key = "Session:sess_tie:2026-01-15T10:30:00.000000Z"
    workspaces = []
    for name, title in (("origin-a", "A"), ("origin-b", "B")):
        workspace = tmp_path / name
        workspace.mkdir()
        WorkspaceDatabase(workspace).close()
        conn = sqlite3.connect(database_path(workspace))
        conn.execute("UPDATE workspace_meta SET value = ? WHERE key = 'origin_id'", (name,))
        payload = {"state": "CREATED", "title": title, "created_at": "2026-01-15T10:30:00.000000Z"}
        conn.execute(
            "INSERT INTO outbox (idempotency_key, entity_type, entity_id, session_id, payload, "
            "created_at) VALUES (?, 'Session', 'sess_tie', 'sess_tie', ?, ?)",
            (key, json.dumps(payload), "2026-01-15T10:30:00.000000Z"),
        )
        conn.commit()
        conn.close()
        workspaces.append(workspace)
    summaries = [await syncer(w, target).drain() for w in reversed(workspaces)]
    assert [s.conflicts for s in summaries] == [0, 1]
    # The tie goes to the greater origin id: "origin-b".
    assert (await fetch(pg_url, "SELECT title FROM sessions"))[0][0] == "B"
    again = await syncer(workspaces[0], target).drain()
    assert again.batches == 0
    conn = sqlite3.connect(database_path(workspaces[0]))
    conn.execute("UPDATE outbox SET state = 'pending'")
    conn.commit()
    conn.close()
    resent = await syncer(workspaces[0], target).drain()
    assert (resent.duplicates, resent.conflicts) == (1, 0)
    assert (await fetch(pg_url, "SELECT count(*) FROM conflicts"))[0][0] == 1


async def test_two_syncers_on_the_same_entities_at_once(tmp_path: Path, pg_url: str) -> None:
    base = tmp_path / "base"
    base.mkdir()
    db = WorkspaceDatabase(base)
    ids = [db.save(Session()).session_id for _ in range(40)]
    db.close()
    names = ("w1", "w2")
    for name in names:
        clone_workspace(base, tmp_path / name)
    for round_ in range(3):
        for name in names:
            db = WorkspaceDatabase(tmp_path / name)
            for session_id in reversed(ids) if name == "w2" else ids:
                db.save(Session(session_id=session_id, title=f"{name}-{round_}"))
            db.close()
    target = PostgresTarget(PostgresSettings(dsn=pg_url, pool_max=4))
    try:
        await syncer(base, target).drain()
        async with anyio.create_task_group() as tg:
            for name in names:
                tg.start_soon(syncer(tmp_path / name, target, batch_max_records=7).drain)
    finally:
        await target.close()
    rows = await fetch(pg_url, "SELECT session_id, title, updated_at FROM sessions")
    assert len(rows) == 40
    # Every entity holds its newest version, whichever syncer delivered it.
    for row in rows:
        versions = []
        for name in names:
            conn = sqlite3.connect(database_path(tmp_path / name))
            versions += conn.execute(
                "SELECT updated_at, title FROM sessions WHERE session_id = ?", (row[0],)
            ).fetchall()
            conn.close()
        assert row["title"] == max(versions)[1]
    for name in names:
        assert {s for s, _ in outbox_states(tmp_path / name)} == {"processed"}


async def test_a_plain_insert_record_syncs(
    workspace: Path, target: PostgresTarget, pg_url: str
) -> None:
    WorkspaceDatabase(workspace).close()
    conn = sqlite3.connect(database_path(workspace))
    conn.execute("BEGIN IMMEDIATE")
    conn.execute(
        "INSERT INTO outbox (idempotency_key, entity_type, entity_id, session_id, payload, "
        "created_at) VALUES (?, ?, ?, ?, ?, ?)",
        (
            "SessionTask:task_go:2026-02-01T08:00:00.500000Z",
            "SessionTask",
            "task_go",
            "sess_go",
            json.dumps(
                {
                    "task_id": "task_go",
                    "session_id": "sess_go",
                    "status": "running",
                    "created_at": "2026-02-01T08:00:00.000000Z",
                }
            ),
            "2026-02-01T08:00:00.500000Z",
        ),
    )
    conn.execute("COMMIT")
    conn.close()
    assert (await syncer(workspace, target).drain()).applied == 1
    rows = await fetch(pg_url, "SELECT status, updated_at::text FROM session_tasks")
    assert [tuple(r) for r in rows] == [("running", "2026-02-01 08:00:00.5+00")]


async def test_syncer_waits_for_an_unsupported_workspace_schema(
    workspace: Path, target: PostgresTarget
) -> None:
    WorkspaceDatabase(workspace).close()
    run_sql(workspace, "DELETE FROM schema_migrations")
    with pytest.raises(SchemaMismatchError, match="syncer needs"):
        await syncer(workspace, target).drain()


async def test_one_syncer_per_workspace(workspace: Path, target: PostgresTarget) -> None:
    WorkspaceDatabase(workspace).close()
    lock = SyncLock(workspace)
    assert lock.try_acquire()
    try:
        with pytest.raises(BusyError, match="another syncer"):
            await syncer(workspace, target).drain(lock_wait=0.3)
    finally:
        lock.release()
    assert (await syncer(workspace, target).drain()).batches == 0


async def test_processed_records_are_pruned_after_retention(
    workspace: Path, target: PostgresTarget
) -> None:
    db = WorkspaceDatabase(workspace)
    for _ in range(3):
        db.save(Session())
    db.close()
    await syncer(workspace, target).drain()
    assert len(outbox_states(workspace)) == 3
    await syncer(workspace, target, retention_days=1e-9).drain()
    assert outbox_states(workspace) == []


async def test_postgres_migrations_are_idempotent_and_locked(pg_url: str) -> None:
    targets = [PostgresTarget(PostgresSettings(dsn=pg_url)) for _ in range(3)]
    try:
        results = []

        async def migrate(t: PostgresTarget) -> None:
            results.append(await t.ensure_schema())

        async with anyio.create_task_group() as tg:
            for t in targets:
                tg.start_soon(migrate, t)
        latest = PG_LATEST
        assert sorted(results) == [(0, latest), (latest, latest), (latest, latest)]
        assert await targets[0].ensure_schema() == (latest, latest)
    finally:
        for t in targets:
            await t.close()
    rows = await fetch(pg_url, "SELECT version FROM schema_migrations ORDER BY version")
    assert [r[0] for r in rows] == list(range(1, PG_LATEST + 1))


async def test_auto_migrate_off_reports_a_missing_schema(pg_url: str) -> None:
    target = PostgresTarget(PostgresSettings(dsn=pg_url, auto_migrate=False))
    try:
        with pytest.raises(SchemaMismatchError, match="auto_migrate is off"):
            await target.ensure_schema()
    finally:
        await target.close()


async def test_failed_postgres_migration_rolls_back(pg_url: str) -> None:
    shipped = load_migrations("postgres")
    broken = parse_migrations(
        [
            ("0001_initial.sql", shipped[0].sql),
            ("0002_bad.sql", "CREATE TABLE t (x int); SELECT 1/0;"),
        ]
    )
    target = PostgresTarget(PostgresSettings(dsn=pg_url))
    try:
        with pytest.raises(MigrationError, match=r"migration 2 \(bad\) failed"):
            await target.ensure_schema(broken)
        assert await target.ensure_schema() == (0, PG_LATEST)
        with pytest.raises(SchemaMismatchError, match="newer"):
            await target.ensure_schema(())
    finally:
        await target.close()
    assert (await fetch(pg_url, "SELECT to_regclass('acode.t') IS NULL"))[0][0] is True


async def test_a_batch_that_always_times_out_while_postgres_answers_is_isolated(
    workspace: Path, target: PostgresTarget, pg_url: str
) -> None:
    await target.ensure_schema()
    conn = await asyncpg.connect(pg_url)
    await conn.execute(
        """
        CREATE FUNCTION acode.stall() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.title = 'stall' THEN
                RAISE EXCEPTION 'canceling statement due to statement timeout'
                    USING ERRCODE = '57014';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER stall BEFORE INSERT OR UPDATE ON acode.sessions
            FOR EACH ROW EXECUTE FUNCTION acode.stall();
        """
    )
    await conn.close()
    db = WorkspaceDatabase(workspace)
    good = [db.save(Session(title="fine")) for _ in range(3)]
    db.save(Session(title="stall"))
    db.close()

    sync = syncer(workspace, target)
    for _ in range(2):  # an outage as far as anyone can tell: nothing is charged
        with pytest.raises(PostgresUnavailableError):
            await sync.drain()
        assert outbox_states(workspace) == [("pending", 0)] * 4
    summary = await sync.drain()  # third strike: the batch is bisected
    assert (summary.applied, summary.retried) == (3, 1)
    assert outbox_states(workspace) == [("processed", 0)] * 3 + [("pending", 1)]
    rows = await fetch(pg_url, "SELECT count(*) FROM sessions")
    assert rows[0][0] == len(good)


async def test_applied_keys_are_pruned_by_whole_partitions(
    workspace: Path, target: PostgresTarget, pg_url: str
) -> None:
    from datetime import UTC, datetime, timedelta

    now = datetime.now(UTC)
    # applied_keys keeps the versions replaced: three 20 days old and one of today's.
    db = WorkspaceDatabase(workspace, OpenOptions(clock=lambda: now - timedelta(days=20)))
    saved = [db.save(Session()) for _ in range(3)]
    db.close()
    db = WorkspaceDatabase(workspace, OpenOptions(clock=lambda: now))
    saved.append(db.save(Session()))
    db.close()
    db = WorkspaceDatabase(workspace, OpenOptions(clock=lambda: now + timedelta(seconds=1)))
    for session in saved:
        db.save(Session(session_id=session.session_id, title="replaced"))
    db.close()
    await syncer(workspace, target).drain()
    conn = await asyncpg.connect(pg_url)
    try:
        # The 20-day-old versions are in the default partition (before the oldest one kept
        # since the migration); today's in today's.
        held = await conn.fetch(
            "SELECT tableoid::regclass::text AS part, count(*) FROM acode.applied_keys "
            "GROUP BY 1 ORDER BY 1"
        )
        assert [tuple(r) for r in held] == [
            ("acode.applied_keys_default", 3),
            (f"acode.applied_keys_p{now:%Y%m%d}", 1),
        ]
        assert await target.prune_applied_keys(now - timedelta(days=14)) == 3
        assert await target.prune_applied_keys(now - timedelta(days=14)) == 0
        # A cutoff inside today's partition keeps it whole: no row is deleted from it.
        assert await target.prune_applied_keys(now) == 0
        tomorrow = now + timedelta(days=1)
        assert (
            await target.prune_applied_keys(
                tomorrow.replace(hour=0, minute=0, second=0, microsecond=0)
            )
            == 1
        )
        # Today's partition is made again at once, empty.
        parts = await conn.fetchval(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'acode.applied_keys'::regclass"
        )
        assert parts == 7  # the default, the two days before, today and three days ahead
    finally:
        await conn.close()


async def test_explicit_migration_runs_even_with_auto_migrate_off(pg_url: str) -> None:
    target = PostgresTarget(PostgresSettings(dsn=pg_url, auto_migrate=False))
    try:
        assert await target.ensure_schema(explicit=True) == (0, PG_LATEST)
        assert await target.ensure_schema() == (PG_LATEST, PG_LATEST)
    finally:
        await target.close()


async def test_a_newer_postgres_schema_is_an_outage_not_a_broken_workspace(
    pg_url: str,
) -> None:
    target = PostgresTarget(PostgresSettings(dsn=pg_url))
    try:
        await target.ensure_schema()
        conn = await asyncpg.connect(pg_url)
        await conn.execute(
            "INSERT INTO acode.schema_migrations (version, name, checksum) VALUES ($1, 'x', 'y')",
            PG_LATEST + 1,
        )
        await conn.close()
        newer = f"PostgreSQL: schema version {PG_LATEST + 1}"
        with pytest.raises(PostgresSchemaMismatchError, match=newer):
            await target.ensure_schema()
    finally:
        await target.close()


async def test_sync_of_a_directory_without_a_workspace(
    tmp_path: Path, target: PostgresTarget
) -> None:
    with pytest.raises(WorkspaceOpenError, match="no workspace database"):
        await syncer(tmp_path, target).drain()
    assert not (tmp_path / ".agent").exists()


async def test_max_batches_ships_exactly_that_many(workspace: Path, target: PostgresTarget) -> None:
    db = WorkspaceDatabase(workspace)
    for _ in range(10):
        db.save(Session())
    db.close()
    first = await syncer(workspace, target, batch_max_records=2).drain(max_batches=3)
    assert (first.batches, first.applied, first.drained) == (3, 6, False)
    assert [s for s, _ in outbox_states(workspace)].count("processed") == 6
    rest = await syncer(workspace, target, batch_max_records=2).drain()
    assert (rest.batches, rest.applied, rest.drained) == (2, 4, True)


HOSTILE_TEXTS = (
    'sess_"],["x", "y"]] --',
    "sess_back\\slash'quote\"; DROP TABLE acode.sessions; --",
    "sess_ünïcødé_😀_\u202eRTL",
    "sess_tab\tnewline\nend",
)


async def test_hostile_ids_and_text_arrive_verbatim(
    workspace: Path, target: PostgresTarget, pg_url: str
) -> None:
    """Ids and text travel to PostgreSQL as one JSON document and one payload blob per
    statement: whatever they hold, they arrive as written and never as structure."""
    WorkspaceDatabase(workspace).close()
    conn = sqlite3.connect(database_path(workspace))
    stamp = "2026-01-15T10:30:00.000000Z"
    for session_id in HOSTILE_TEXTS:
        payload = session_payload(session_id, stamp, title=session_id[::-1])
        key = f"Session:{session_id}:{stamp}"
        enqueue_raw(conn, key, "Session", session_id, session_id, json.dumps(payload), stamp)
    conn.commit()
    conn.close()

    summary = await syncer(workspace, target).drain()

    assert (summary.applied, summary.dead, summary.retried) == (len(HOSTILE_TEXTS), 0, 0)
    rows = await fetch(pg_url, "SELECT session_id, title FROM sessions ORDER BY session_id")
    assert sorted((r["session_id"], r["title"]) for r in rows) == sorted(
        (s, s[::-1]) for s in HOSTILE_TEXTS
    )
    keys = await fetch(pg_url, APPLIED_VERSION_KEYS)
    assert sorted(r[0] for r in keys) == sorted(f"Session:{s}:{stamp}" for s in HOSTILE_TEXTS)


async def test_a_well_formed_but_impossible_time_is_the_records_own_failure(
    workspace: Path, target: PostgresTarget, pg_url: str
) -> None:
    """The claim only checks a key's shape; PostgreSQL refuses the impossible time, and
    bisection pins it on that record alone."""
    db = WorkspaceDatabase(workspace)
    good = db.save(Session(title="fine"))
    db.close()
    conn = sqlite3.connect(database_path(workspace))
    bad_time = "2026-02-30T10:30:00.000000Z"  # in range, yet no such day
    key = f"Session:sess_bad:{bad_time}"
    enqueue_raw(conn, key, "Session", "sess_bad", "sess_bad", "{}", "2026-01-15T10:30:00.000000Z")
    conn.commit()
    conn.close()

    summary = await syncer(workspace, target).drain()

    assert (summary.applied, summary.retried) == (1, 1)
    rows = await fetch(pg_url, "SELECT session_id FROM sessions")
    assert [r[0] for r in rows] == [good.session_id]
    [(state, attempts, error)] = run_sql(
        workspace, "SELECT state, attempts, last_error FROM outbox WHERE entity_id = 'sess_bad'"
    )
    assert (state, attempts) == ("pending", 1)
    assert error.startswith("22008")  # datetime field overflow


async def test_a_payload_that_is_not_utf8_is_the_records_own_failure(
    workspace: Path, target: PostgresTarget, pg_url: str
) -> None:
    """A writer can store any bytes as TEXT: the syncer ships them as they are and
    PostgreSQL's refusal is pinned on that record alone."""
    db = WorkspaceDatabase(workspace)
    good = db.save(Session(title="fine"))
    db.close()
    run_sql(
        workspace,
        "INSERT INTO outbox (idempotency_key, entity_type, entity_id, session_id, payload, "
        "created_at) VALUES (?, 'Session', 'sess_bytes', 'sess_bytes', "
        "CAST(X'7B227469746C65223A22FF227D' AS TEXT), ?)",  # {"title":"\xff"}
        (f"Session:sess_bytes:{good.updated_at}", good.created_at),
    )

    summary = await syncer(workspace, target).drain()

    assert (summary.applied, summary.retried) == (1, 1)
    [(error,)] = run_sql(workspace, "SELECT last_error FROM outbox WHERE entity_id = 'sess_bytes'")
    assert error.startswith("22021")  # character not in repertoire: invalid UTF-8


async def test_text_that_is_not_utf8_fails_its_record_not_the_workspace(
    workspace: Path, target: PostgresTarget, pg_url: str
) -> None:
    """The driver cannot decode such text: the claim reads the batch again tolerantly, the
    record fails with a clear error, the others go on, and the record still lists."""
    db = WorkspaceDatabase(workspace)
    good = db.save(Session(title="fine"))
    db.close()
    conn = sqlite3.connect(database_path(workspace))
    conn.execute(
        "INSERT INTO outbox (idempotency_key, entity_type, entity_id, session_id, payload, "
        "created_at) VALUES (CAST(? AS TEXT), 'Session', CAST(? AS TEXT), NULL, '{}', ?)",
        (f"Session:sess_\xff:{good.updated_at}".encode("latin-1"), b"sess_\xff", good.created_at),
    )
    conn.commit()

    summary = await syncer(workspace, target).drain()

    assert (summary.applied, summary.retried) == (1, 1)
    listed = list_records(conn, failed_only=False, limit=10)
    conn.close()
    assert [(r["entity_id"], r["attempts"]) for r in listed] == [("sess_\\xff", 1)]
    assert listed[0]["last_error"] == "a text column of the record is not valid UTF-8"
