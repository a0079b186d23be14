"""`restore`: run state rebuilt from the real PostgreSQL into real workspace files."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from acode_sync.config import PostgresSettings, SyncSettings
from acode_sync.domain import (
    Artifact,
    Session,
    SessionEvent,
    SessionState,
    SessionTask,
    Step,
    ToolCall,
)
from acode_sync.errors import BusyError, PostgresSchemaMismatchError, RecordRejectedError
from acode_sync.postgres import PostgresTarget
from acode_sync.restore import (
    RESTORE_ORDER,
    STATEMENTS,
    RestoreReport,
    RestoreRequest,
    Selection,
    restore,
)
from acode_sync.store import WorkspaceStore
from acode_sync.sync import SyncLock, WorkspaceSyncer
from acode_sync.workspace import OpenOptions, database_path
from tests.central import fetch
from tests.records import enqueue_raw, run_sql

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

TABLE_NAMES = [STATEMENTS[t].spec.table for t in RESTORE_ORDER]


@pytest.fixture
async def settings(pg_url: str) -> PostgresSettings:
    settings = PostgresSettings(dsn=pg_url, connect_timeout=5, statement_timeout=10)
    target = PostgresTarget(settings)
    await target.ensure_schema()
    await target.close()
    return settings


async def ship(workspace: Path, settings: PostgresSettings) -> None:
    target = PostgresTarget(settings)
    try:
        summary = await WorkspaceSyncer(
            workspace=workspace, target=target, settings=SyncSettings()
        ).drain()
    finally:
        await target.close()
    assert (summary.retried, summary.dead, summary.conflicts, summary.backlog) == (0, 0, 0, 0)


def rows(workspace: Path, table: str) -> dict[str, dict[str, Any]]:
    """A table's rows by id, JSON columns decoded (values compared, not spellings)."""
    st = next(s for s in STATEMENTS.values() if s.spec.table == table)
    found = run_sql(workspace, f"SELECT {', '.join(st.columns)} FROM {table}")
    decoded = {}
    for values in found:
        row = dict(zip(st.columns, values, strict=True))
        for column in st.json_columns:
            if row[column] is not None:
                row[column] = json.loads(row[column])
        decoded[row[st.spec.id_column]] = row
    return decoded


async def run_restore(
    settings: PostgresSettings, workspace: Path, selection: Selection, chunk_rows: int = 2
) -> RestoreReport:
    return await restore(settings, RestoreRequest(workspace, selection, chunk_rows=chunk_rows))


async def write_run(store: WorkspaceStore) -> Session:
    """A session with one of each entity; JSON whose key order jsonb does not keep."""
    session = await store.save(
        Session(title="fix the build", metadata={"tool": "pytest", "args": [1.5, 100, "é\n"]})
    )
    session = await store.save(
        Session(session_id=session.session_id, state=SessionState.PLANNING, title="fix it")
    )
    task = await store.save(SessionTask(session_id=session.session_id, title="reproduce"))
    step = await store.save(Step(session_id=session.session_id, task_id=task.task_id))
    await store.save(
        ToolCall(
            session_id=session.session_id,
            step_id=step.step_id,
            name="bash",
            arguments={"zeta": 1, "cmd": "make test", "nested": {"bb": None, "a": True}},
            result={"exit": 0, "stdout": "ok ✓"},
        )
    )
    await store.append_event(session.session_id, "note", {"text": "started", "n": 1})
    await store.save(Artifact(session_id=session.session_id, type="diff", content="+x\n-y"))
    return session


async def test_restore_is_exact_and_proven_by_the_recorded_digests(
    store: WorkspaceStore, settings: PostgresSettings, tmp_path: Path
) -> None:
    session = await write_run(store)
    await ship(store.path.parent.parent, settings)
    origin = store.origin_id
    restored = tmp_path / "another-machine"
    restored.mkdir()

    report = await run_restore(settings, restored, Selection(session_ids=(session.session_id,)))

    source = store.path.parent.parent
    for table in TABLE_NAMES:
        assert rows(restored, table) == rows(source, table), table
        assert report.tables[table].restored == len(rows(source, table)) > 0
        assert report.tables[table].verified == report.tables[table].restored
    assert report.total("not_reproducible") == report.total("no_digest") == 0
    assert run_sql(restored, "SELECT count(*) FROM outbox") == [(0,)]
    assert report.origin_id != origin
    # The origin's bytes are not what jsonb gives back: payload_digest could not prove this.
    (held,) = await fetch(settings, "SELECT arguments::text AS a FROM acode.tool_calls")
    assert held["a"].startswith('{"cmd"')


async def test_a_restored_session_resumes_on_another_machine_without_conflict(
    store: WorkspaceStore, settings: PostgresSettings, tmp_path: Path
) -> None:
    session = await write_run(store)
    await ship(store.path.parent.parent, settings)
    other = tmp_path / "runner-2"
    other.mkdir()
    await run_restore(settings, other, Selection(session_ids=(session.session_id,)))

    async with await WorkspaceStore.open(other, OpenOptions(busy_timeout=5.0)) as resumed:
        current = await resumed.get(Session, session.session_id)
        assert current == await store.get(Session, session.session_id)
        assert current is not None
        moved = await resumed.save(
            Session(session_id=current.session_id, state=SessionState.EXECUTING, title="go")
        )
        await resumed.append_event(session.session_id, "resumed")
        (base,) = run_sql(other, "SELECT base_updated_at FROM outbox WHERE entity_type = 'Session'")
        assert base == (current.updated_at,)
        await ship(other, settings)
        new_origin = resumed.origin_id

    assert await fetch(settings, "SELECT * FROM acode.conflicts") == []
    (central,) = await fetch(
        settings,
        "SELECT state, origin_id, idempotency_key FROM acode.sessions WHERE session_id = $1",
        session.session_id,
    )
    assert dict(central) == {
        "state": "EXECUTING",
        "origin_id": new_origin,
        "idempotency_key": f"Session:{session.session_id}:{moved.updated_at}",
    }


def write_plain(workspace: Path, event_id: str, session_id: str, payload: str) -> None:
    """A writer of the plain-INSERT contract: its own JSON spelling, a key this program
    does not know."""
    stamp = json.loads(payload)["updated_at"]
    conn = sqlite3.connect(database_path(workspace), isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT INTO session_events (event_id, session_id, event_type, payload, created_at,"
            " updated_at) VALUES (?, ?, 'vendor', NULL, ?, ?)",
            (event_id, session_id, stamp, stamp),
        )
        enqueue_raw(
            conn,
            f"SessionEvent:{event_id}:{stamp}",
            "SessionEvent",
            event_id,
            session_id,
            payload,
            stamp,
        )
        conn.execute("COMMIT")
    finally:
        conn.close()


async def test_unknown_keys_are_kept_and_sent_again_after_a_restore(
    store: WorkspaceStore, settings: PostgresSettings, tmp_path: Path
) -> None:
    session = await write_run(store)
    source = store.path.parent.parent
    stamp = "2026-01-15T10:30:00.000001Z"
    full = (
        '{ "event_type" : "vendor", "event_id": "evt_plain1", "session_id": "%s", '
        '"payload": null, "created_at": "%s", "updated_at": "%s", "vendor_tag": {"k": [1E2]} }'
    )
    write_plain(source, "evt_plain1", session.session_id, full % (session.session_id, stamp, stamp))
    lacking = (
        '{"event_id": "evt_plain2", "session_id": "%s", "event_type": "vendor", '
        '"created_at": "%s", "updated_at": "%s"}'
    )
    write_plain(
        source, "evt_plain2", session.session_id, lacking % (session.session_id, stamp, stamp)
    )
    await ship(source, settings)
    restored = tmp_path / "restored"
    restored.mkdir()

    report = await run_restore(settings, restored, Selection(session_ids=(session.session_id,)))

    events = rows(restored, "session_events")
    assert events["evt_plain1"]["extra"] == {"vendor_tag": {"k": [100]}}
    # Written without "payload": the row cannot rebuild what was sent, and says so.
    counts = report.tables["session_events"]
    assert (counts.restored, counts.verified, counts.not_reproducible) == (3, 2, 1)

    async with await WorkspaceStore.open(restored, OpenOptions(busy_timeout=5.0)) as resumed:
        event = await resumed.get(SessionEvent, "evt_plain1")
        assert event is not None
        await resumed.save(SessionEvent(**{**event.row(), "event_type": "vendor-2"}))
        await ship(restored, settings)
    (central,) = await fetch(
        settings,
        "SELECT event_type, extra FROM acode.session_events WHERE event_id = $1",
        "evt_plain1",
    )
    assert central["event_type"] == "vendor-2"
    assert json.loads(central["extra"]) == {"vendor_tag": {"k": [100]}}


async def test_rows_without_a_recorded_digest_are_counted_apart(
    store: WorkspaceStore, settings: PostgresSettings, tmp_path: Path
) -> None:
    session = await write_run(store)
    await ship(store.path.parent.parent, settings)
    conn = await asyncpg.connect(settings.connect_dsn())
    try:  # as a row applied before migration 0004 is
        await conn.execute("UPDATE acode.artifacts SET canonical_digest = NULL")
    finally:
        await conn.close()
    report = await run_restore(settings, tmp_path, Selection())
    assert report.tables["artifacts"].no_digest == report.tables["artifacts"].restored == 1
    assert report.tables["artifacts"].verified == 0
    assert report.total("verified") == report.total("restored") - 1
    assert session.session_id in rows(tmp_path, "sessions")


async def test_an_existing_workspace_keeps_newer_and_equal_local_versions(
    store: WorkspaceStore, settings: PostgresSettings, tmp_path: Path
) -> None:
    session = await write_run(store)
    source = store.path.parent.parent
    await ship(source, settings)
    copy = tmp_path / "copy"
    copy.mkdir()
    await run_restore(settings, copy, Selection())
    # Central moves on for the session; the copy moves on for the task.
    newer = await store.save(
        Session(session_id=session.session_id, state=SessionState.EXECUTING, title="later")
    )
    await ship(source, settings)
    async with await WorkspaceStore.open(copy, OpenOptions(busy_timeout=5.0)) as local:
        (task_id,) = rows(copy, "session_tasks")
        task = await local.get(SessionTask, task_id)
        assert task is not None
        mine = await local.save(SessionTask(**{**task.row(), "status": "done"}))

    report = await run_restore(settings, copy, Selection())

    assert rows(copy, "sessions")[session.session_id]["updated_at"] == newer.updated_at
    assert rows(copy, "session_tasks")[task_id]["status"] == "done"
    assert report.total("restored") == report.tables["sessions"].restored == 1
    assert report.total("skipped_newer") == 1
    assert report.total("skipped_same") == report.total("read") - 2
    assert any(task_id in line and str(mine.updated_at) in line for line in report.lines())


async def test_an_origins_rows_without_their_parents_are_skipped(
    store: WorkspaceStore, settings: PostgresSettings, tmp_path: Path
) -> None:
    session = await write_run(store)
    source = store.path.parent.parent
    await ship(source, settings)
    other = tmp_path / "other"
    other.mkdir()
    await run_restore(settings, other, Selection())
    async with await WorkspaceStore.open(other, OpenOptions(busy_timeout=5.0)) as second:
        task = await second.save(SessionTask(session_id=session.session_id, title="second"))
        await second.save(Step(session_id=session.session_id, task_id=task.task_id))
        await ship(other, settings)
        second_origin = second.origin_id
    fresh = tmp_path / "fresh"
    fresh.mkdir()

    report = await run_restore(settings, fresh, Selection(origin=second_origin))

    assert report.total("restored") == 0
    assert report.tables["session_tasks"].skipped_orphan == 1
    assert report.tables["steps"].skipped_orphan == 1
    assert any(f"session_id {session.session_id}" in line for line in report.lines())
    assert rows(fresh, "session_tasks") == {}


async def test_bad_requests_fail_clearly_and_write_nothing(
    store: WorkspaceStore, settings: PostgresSettings, pg_url: str, tmp_path: Path
) -> None:
    session = await write_run(store)
    await ship(store.path.parent.parent, settings)
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises(RecordRejectedError, match="no session sess_missing in PostgreSQL"):
        await run_restore(
            settings, target, Selection(session_ids=(session.session_id, "sess_missing"))
        )
    with pytest.raises(RecordRejectedError, match="no entity written by origin nobody"):
        await run_restore(settings, target, Selection(origin="nobody"))
    assert not database_path(target).exists()

    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("DROP SCHEMA acode CASCADE")
    finally:
        await conn.close()
    with pytest.raises(PostgresSchemaMismatchError, match="no acode schema"):
        await run_restore(settings, target, Selection())
    assert not database_path(target).exists()


async def test_an_old_central_schema_is_refused(pg_url: str, tmp_path: Path) -> None:
    from acode_sync.migrations import load_migrations

    settings = PostgresSettings(dsn=pg_url, connect_timeout=5, statement_timeout=10)
    target = PostgresTarget(settings)
    try:
        await target.ensure_schema(load_migrations("postgres")[:3])
    finally:
        await target.close()
    with pytest.raises(
        PostgresSchemaMismatchError, match="at version 3; a restore needs version 4"
    ):
        await run_restore(settings, tmp_path, Selection())
    assert not database_path(tmp_path).exists()


async def test_a_workspace_a_syncer_holds_is_refused(
    store: WorkspaceStore, settings: PostgresSettings
) -> None:
    session = await write_run(store)
    workspace = store.path.parent.parent
    await ship(workspace, settings)
    run_sql(workspace, "DELETE FROM artifacts")
    lock = SyncLock(workspace)
    assert lock.try_acquire()
    try:
        with pytest.raises(BusyError, match="holds the sync lock"):
            await run_restore(settings, workspace, Selection(session_ids=(session.session_id,)))
    finally:
        lock.release()
    assert rows(workspace, "artifacts") == {}
    report = await run_restore(settings, workspace, Selection(session_ids=(session.session_id,)))
    assert report.total("restored") == 1


async def test_progress_counts_the_entities_read(
    store: WorkspaceStore, settings: PostgresSettings, tmp_path: Path
) -> None:
    await write_run(store)
    await ship(store.path.parent.parent, settings)
    seen: list[int] = []
    await restore(
        settings, RestoreRequest(tmp_path, Selection(), chunk_rows=2), progress=seen.append
    )
    assert seen == sorted(seen)
    assert seen[-1] == 6  # one of each entity


async def test_an_unreachable_postgresql_is_acode_db_005_and_writes_nothing(
    tmp_path: Path,
) -> None:
    from acode_sync.errors import PostgresUnavailableError

    settings = PostgresSettings(
        dsn="postgresql://acode:s3cret@127.0.0.1:1/acode", connect_timeout=2
    )
    with pytest.raises(PostgresUnavailableError) as raised:
        await run_restore(settings, tmp_path, Selection())
    assert "s3cret" not in str(raised.value)
    assert not database_path(tmp_path).exists()
