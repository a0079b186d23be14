"""Holes an operator meets on a bad day: a resend storm's log volume, a restore's tie,
a flush behind a daemon's backoff, a repair judged a conflict. Real SQLite files and a
real PostgreSQL; each test failed on the code before its fix."""

from __future__ import annotations

import io
import json
import sqlite3
from pathlib import Path

import anyio
import anyio.to_thread
import asyncpg
import pytest

from acode_sync import cli
from acode_sync.config import PostgresSettings, SyncSettings
from acode_sync.domain import Session
from acode_sync.log import configure_logging
from acode_sync.postgres import PostgresTarget
from acode_sync.restore import RestoreRequest, Selection, restore
from acode_sync.store import WorkspaceDatabase, WorkspaceStore
from acode_sync.sync import WorkspaceSyncer
from acode_sync.verify import Kind, Verifier
from acode_sync.workspace import database_path
from tests.integration.test_restore import settings, ship
from tests.records import run_sql

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]
__all__ = ["settings"]  # a fixture, used by name


def events(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def test_a_resend_storm_logs_its_duplicates_at_debug_and_counts_them(
    workspace: Path, pg_url: str
) -> None:
    db = WorkspaceDatabase(workspace)
    for _ in range(5):
        db.save(Session())
    db.close()
    target = PostgresTarget(PostgresSettings(dsn=pg_url))
    try:
        syncer = WorkspaceSyncer(workspace=workspace, target=target, settings=SyncSettings())
        assert (await syncer.drain()).applied == 5
        for level, shown in (("info", []), ("debug", ["duplicate"] * 5)):
            run_sql(workspace, "UPDATE outbox SET state = 'pending', processed_at = NULL")
            stream = io.StringIO()
            configure_logging(level=level, json_lines=True, stream=stream)
            resent = WorkspaceSyncer(workspace=workspace, target=target, settings=SyncSettings())
            summary = await resent.drain()
            assert (summary.applied, summary.duplicates) == (0, 5)
            logged = [e for e in events(stream) if e["event"] == "duplicate"]
            assert [e["event"] for e in logged] == shown
            assert all(e["level"] == "debug" and e["idempotency_key"] for e in logged)
    finally:
        await target.close()


async def test_a_restore_tie_with_other_content_is_reported_apart_and_kept(
    store: WorkspaceStore, settings: PostgresSettings
) -> None:
    # The store spells the JSON its own way (insertion order), PostgreSQL as jsonb: equal
    # values, other text. Only the edited title is a difference.
    edited = await store.save(Session(title="central title", metadata={"tool": "x", "args": [1]}))
    same = await store.save(Session(title="untouched", metadata={"tool": "y", "args": [2.5]}))
    workspace = store.path.parent.parent
    await ship(workspace, settings)
    run_sql(
        workspace,
        "UPDATE sessions SET title = 'edited locally' WHERE session_id = ?",
        (edited.session_id,),
    )

    report = await restore(settings, RestoreRequest(workspace, Selection()))

    counts = report.tables["sessions"]
    assert (counts.skipped_same, counts.skipped_differs, counts.restored) == (1, 1, 0)
    assert report.as_dict()["tables"]["sessions"]["skipped_differs"] == 1
    (why,) = [line for line in report.skipped_examples if edited.session_id in line]
    assert "with other content than PostgreSQL's" in why
    assert "1 at that version locally with other content" in "\n".join(report.lines())
    titles = dict(run_sql(workspace, "SELECT session_id, title FROM sessions"))
    assert titles == {edited.session_id: "edited locally", same.session_id: "untouched"}


async def test_repairing_a_stale_row_ships_without_a_conflict(
    store: WorkspaceStore,
    settings: PostgresSettings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """PostgreSQL restored from a backup taken after v1: it holds v1, the workspace v3 (whose
    kept record is based on v2). The repaired v3 replaces v1 as a plain update."""
    v1 = await store.save(Session(title="v1"))
    workspace = store.path.parent.parent
    await ship(workspace, settings)
    await store.save(Session(session_id=v1.session_id, title="v2"))
    v3 = await store.save(Session(session_id=v1.session_id, title="v3"))
    await ship(workspace, settings)
    conn = await asyncpg.connect(settings.connect_dsn())
    try:
        await conn.execute(
            "UPDATE acode.sessions SET updated_at = $2::text::timestamptz, title = 'v1', "
            "idempotency_key = 'Session:' || session_id || ':' || $2 WHERE session_id = $1",
            v1.session_id,
            v1.updated_at,
        )
        await conn.execute(  # the backup predates the later versions' keys too
            "DELETE FROM acode.applied_keys WHERE idempotency_key LIKE 'Session:' || $1 || ':%' "
            "AND idempotency_key <> 'Session:' || $1 || ':' || $2",
            v1.session_id,
            v1.updated_at,
        )
    finally:
        await conn.close()
    target = PostgresTarget(settings)
    try:
        found = await Verifier(workspace=workspace, target=target).run(repair=True)
        assert [(d.kind, d.central_version) for d in found.problems] == [
            (Kind.STALE, v1.updated_at)
        ]
        assert found.queued == 1
        await ship(workspace, settings)  # asserts no conflict in the drain's summary
        assert (await Verifier(workspace=workspace, target=target).run()).ok
    finally:
        await target.close()
    monkeypatch.setenv("ACODE_POSTGRES_URL", settings.dsn)
    capsys.readouterr()  # the drains' log lines
    listed = ["db", "conflicts", "list", "--json"]
    assert await anyio.to_thread.run_sync(cli.main, listed) == 0
    assert json.loads(capsys.readouterr().out) == []
    rows = run_sql(
        workspace,
        "SELECT base_updated_at FROM outbox WHERE idempotency_key = ?",
        (f"Session:{v3.session_id}:{v3.updated_at}",),
    )
    assert rows == [(v1.updated_at,)]


def put_backup_in_place(source: Path, workspace: Path, backup: Path) -> None:
    """operations.md's restore of a backup: an online backup, the stale -wal and -shm
    removed, the copy renamed over the database."""
    original, copy = sqlite3.connect(database_path(source)), sqlite3.connect(backup)
    original.backup(copy)
    original.close()
    copy.close()
    backup.chmod(0o600)
    for side in ("-wal", "-shm"):
        Path(f"{database_path(workspace)}{side}").unlink(missing_ok=True)
    backup.replace(database_path(workspace))


async def test_a_database_replaced_under_a_kept_connection_is_reopened(
    tmp_path: Path, pg_url: str
) -> None:
    """A backup put in place while the daemon runs (its -wal and -shm removed, as
    operations.md says): the worker's kept connection still read the old file, so the new
    one's records waited as long as the workspace stayed busy."""
    workspace, other = tmp_path / "ws", tmp_path / "other"
    for path in (workspace, other):
        path.mkdir()
        db = WorkspaceDatabase(path)
        db.save(Session(title=path.name))
        db.close()
    stream = io.StringIO()
    configure_logging(level="info", json_lines=True, stream=stream)
    target = PostgresTarget(PostgresSettings(dsn=pg_url))
    try:
        syncer = WorkspaceSyncer(workspace=workspace, target=target, settings=SyncSettings())
        assert (await syncer.drain(keep_open=True)).applied == 1
        put_backup_in_place(other, workspace, tmp_path / "backup.db")
        db = WorkspaceDatabase(workspace)
        db.save(Session(title="after the backup was put in place"))
        db.close()
        assert (await syncer.drain(keep_open=True)).applied == 2
        await syncer.release()
    finally:
        await target.close()
    assert [e["event"] for e in events(stream)] == ["workspace database replaced: reopening it"]
    assert run_sql(workspace, "SELECT count(*) FROM outbox WHERE state = 'pending'") == [(0,)]
