"""The version history ([postgres] keep_history) and `restore --as-of`, on the real
PostgreSQL and real workspace files."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest

from acode_sync.cli import main
from acode_sync.config import PostgresSettings, SyncSettings
from acode_sync.domain import (
    Artifact,
    Session,
    SessionState,
    SessionTask,
    Step,
    ToolCall,
    format_timestamp,
)
from acode_sync.errors import PostgresSchemaMismatchError, RecordRejectedError
from acode_sync.history import horizon, maintain_history
from acode_sync.postgres import PostgresTarget
from acode_sync.restore import RestoreReport, RestoreRequest, Selection, parse_as_of, restore
from acode_sync.store import WorkspaceStore
from acode_sync.sync import WorkspaceSyncer
from acode_sync.workspace import OpenOptions, database_path
from tests.central import fetch
from tests.integration.test_restore import TABLE_NAMES, rows
from tests.records import enqueue_raw, run_sql, session_payload

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

RETENTION_DAYS = 7  # fewer partitions to make per test than the default 90
START = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=6)


class SteppingClock:
    """The store's clock: a known time, moved by the test."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now

    def at(self, minutes: int) -> str:
        self.now = START + timedelta(minutes=minutes)
        return format_timestamp(self.now)


@pytest.fixture
async def settings(pg_url: str) -> PostgresSettings:
    settings = PostgresSettings(
        dsn=pg_url,
        connect_timeout=5,
        statement_timeout=10,
        keep_history=True,
        history_retention_days=RETENTION_DAYS,
    )
    target = PostgresTarget(settings)
    try:
        report = await maintain_history(target)
    finally:
        await target.close()
    assert len(report.created) == RETENTION_DAYS + 1 + 7  # the retention, today, ahead
    return settings


async def ship(workspace: Path, settings: PostgresSettings) -> Any:
    target = PostgresTarget(settings)
    try:
        return await WorkspaceSyncer(
            workspace=workspace, target=target, settings=SyncSettings()
        ).drain()
    finally:
        await target.close()


async def history(settings: PostgresSettings) -> list[tuple[str, str, str]]:
    found = await fetch(
        settings,
        "SELECT entity_type, entity_id, idempotency_key FROM acode.entity_history "
        "ORDER BY version, entity_type",
    )
    return [tuple(r) for r in found]


def snapshot(workspace: Path) -> dict[str, dict[str, dict[str, Any]]]:
    return {table: rows(workspace, table) for table in TABLE_NAMES}


async def as_of(
    settings: PostgresSettings, workspace: Path, when: str, **selection: Any
) -> RestoreReport:
    await anyio.Path(workspace).mkdir(exist_ok=True)
    chosen = Selection(as_of=parse_as_of(when), **selection)
    return await restore(settings, RestoreRequest(workspace, chosen, chunk_rows=2))


async def test_every_applied_version_is_appended_once_and_restored_as_of_a_time(
    workspace: Path, settings: PostgresSettings, tmp_path: Path
) -> None:
    clock = SteppingClock()
    states: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    async with await WorkspaceStore.open(workspace, OpenOptions(clock=clock)) as store:
        clock.at(0)
        session = await store.save(Session(title="v1", metadata={"b": 1, "a": [1.50, "é"]}))
        task = await store.save(SessionTask(session_id=session.session_id, title="t"))
        step = await store.save(Step(session_id=session.session_id, task_id=task.task_id))
        t1 = clock.at(10)
        states[t1] = snapshot(workspace)
        clock.at(20)
        session = await store.save(replace(session, state=SessionState.PLANNING, title="v2"))
        call = await store.save(
            ToolCall(session_id=session.session_id, step_id=step.step_id, name="bash")
        )
        await store.append_event(session.session_id, "note", {"n": 1})
        t2 = clock.at(30)
        states[t2] = snapshot(workspace)
        await ship(workspace, settings)  # v1 and v2 shipped in one drain
        clock.at(40)
        session = await store.save(replace(session, state=SessionState.EXECUTING, title="v3"))
        await store.save(replace(call, status="done", result={"exit": 0}))
        await store.save(Artifact(session_id=session.session_id, type="diff", content="+x"))
        t3 = clock.at(50)
        states[t3] = snapshot(workspace)
        await ship(workspace, settings)
        origin = store.origin_id

    versions = await history(settings)
    assert len(versions) == 9  # every version written, each once
    assert len({key for _, _, key in versions}) == 9
    assert [key for kind, _, key in versions if kind == "Session"] == [
        f"Session:{session.session_id}:{format_timestamp(START + timedelta(minutes=m))}"
        for m in (0, 20, 40)
    ]
    origins = await fetch(settings, "SELECT DISTINCT origin_id FROM acode.entity_history")
    assert [r["origin_id"] for r in origins] == [origin]

    # A resend with its applied keys pruned appends nothing: the versions held come back
    # as duplicates, the older ones as conflicts that the version held wins.
    await fetch(settings, "DELETE FROM acode.applied_keys")
    run_sql(workspace, "UPDATE outbox SET state = 'pending', processed_at = NULL")
    again = await ship(workspace, settings)
    assert (again.applied, again.duplicates, again.conflicts) == (0, 6, 3)
    assert await history(settings) == versions

    for n, moment in enumerate((t1, t2, t3)):
        restored = tmp_path / f"restored-{n}"
        report = await as_of(settings, restored, moment, session_ids=(session.session_id,))
        assert snapshot(restored) == states[moment], moment
        assert report.total("restored") == report.total("verified") > 0
        assert report.total("not_reproducible") == report.total("unknown_as_of") == 0
        assert report.lines()[0].startswith(f"restored into {restored} as of {moment}")
    # Before the first version: nothing existed, nothing is restored.
    before = format_timestamp(START - timedelta(minutes=1))
    report = await as_of(settings, tmp_path / "before", before)
    assert report.total("read") == report.total("restored") == 0
    # The selections apply as of the time too: the origin's entities, or everything.
    origin_report = await as_of(settings, tmp_path / "origin", t2, origin=origin)
    assert snapshot(tmp_path / "origin") == states[t2]
    assert origin_report.as_dict()["as_of"] == t2
    await as_of(settings, tmp_path / "all", t1)
    assert snapshot(tmp_path / "all") == states[t1]


async def test_a_conflicts_loser_is_not_in_the_history(
    workspace: Path, settings: PostgresSettings, tmp_path: Path
) -> None:
    clock = SteppingClock()
    async with await WorkspaceStore.open(workspace, OpenOptions(clock=clock)) as store:
        clock.at(0)
        session = await store.save(Session(title="base"))
        await ship(workspace, settings)
        other = tmp_path / "other"
        await as_of(settings, other, clock.at(1))
        clock.at(5)
        await store.save(replace(session, title="here"))
        await ship(workspace, settings)
    # The other machine changes the version it restored, later than this one's change:
    # it wins; then this one's older edit... is already in. And an edit based on the old
    # version but earlier than the winner loses.
    later = SteppingClock()
    async with await WorkspaceStore.open(other, OpenOptions(clock=later)) as store:
        later.at(3)
        restored = await store.get(Session, session.session_id)
        assert restored is not None
        await store.save(replace(restored, title="there, earlier"))
        summary = await ship(other, settings)
    assert summary.conflicts == 1
    (conflict,) = await fetch(settings, "SELECT winner, incoming_key FROM acode.conflicts")
    assert conflict["winner"] == "current"
    keys = [key for _, _, key in await history(settings)]
    assert conflict["incoming_key"] not in keys
    assert len(keys) == 2


async def test_history_off_writes_nothing(workspace: Path, settings: PostgresSettings) -> None:
    async with await WorkspaceStore.open(workspace) as store:
        await store.save(Session(title="x"))
    await ship(workspace, replace(settings, keep_history=False))
    assert await history(settings) == []
    assert len(await fetch(settings, "SELECT * FROM acode.sessions")) == 1


async def test_a_version_older_than_the_retention_is_not_kept(
    workspace: Path, settings: PostgresSettings
) -> None:
    async with await WorkspaceStore.open(workspace):
        pass
    old = format_timestamp(datetime.now(UTC) - timedelta(days=120))
    recent = format_timestamp(datetime.now(UTC) - timedelta(days=1))
    conn = sqlite3.connect(database_path(workspace), isolation_level=None)
    try:
        for sid, stamp in (("sess_old", old), ("sess_recent", recent)):
            conn.execute("BEGIN IMMEDIATE")
            payload = json.dumps(session_payload(sid, stamp))
            enqueue_raw(conn, f"Session:{sid}:{stamp}", "Session", sid, sid, payload, stamp)
            conn.execute("COMMIT")
    finally:
        conn.close()
    summary = await ship(workspace, settings)
    assert summary.applied == 2
    assert [entity_id for _, entity_id, _ in await history(settings)] == ["sess_recent"]


async def test_retention_drops_old_partitions_and_restore_refuses_older_times(
    workspace: Path, settings: PostgresSettings, tmp_path: Path
) -> None:
    clock = SteppingClock()
    async with await WorkspaceStore.open(workspace, OpenOptions(clock=clock)) as store:
        clock.at(0)
        await store.save(Session(title="x"))
    await ship(workspace, settings)
    conn = await asyncpg.connect(settings.connect_dsn())
    try:
        begins = await horizon(conn)
    finally:
        await conn.close()
    assert begins is not None
    too_old = format_timestamp(begins - timedelta(seconds=1))
    with pytest.raises(RecordRejectedError, match="older than the version history"):
        await as_of(settings, tmp_path / "a", too_old)

    target = PostgresTarget(settings)
    try:
        report = await maintain_history(
            target, datetime.now(UTC) + timedelta(days=RETENTION_DAYS + 1)
        )
    finally:
        await target.close()
    assert len(report.dropped) >= RETENTION_DAYS
    assert await history(settings) == []  # the partition holding the version is gone
    assert report.horizon is not None
    assert report.horizon > START


async def test_an_entity_whose_version_then_predates_the_history_is_reported(
    workspace: Path, settings: PostgresSettings, tmp_path: Path
) -> None:
    clock = SteppingClock()
    async with await WorkspaceStore.open(workspace, OpenOptions(clock=clock)) as store:
        clock.at(0)
        session = await store.save(Session(title="before the history"))
        await ship(workspace, replace(settings, keep_history=False))
        then = clock.at(5)
        clock.at(10)
        await store.save(replace(session, title="with the history"))
        await ship(workspace, settings)
    report = await as_of(settings, tmp_path / "r", then)
    assert report.tables["sessions"].unknown_as_of == 1
    assert report.total("restored") == 0
    assert report.unknown_examples == [
        f"Session {session.session_id}: its version at {then} is not in the history"
    ]
    assert "not restored: 1 that existed at" in "\n".join(report.lines())


async def test_as_of_refused_without_a_history_or_the_schema(
    workspace: Path, pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = PostgresSettings(dsn=pg_url, connect_timeout=5, statement_timeout=10)
    target = PostgresTarget(plain)
    try:
        await target.ensure_schema()
    finally:
        await target.close()
    with pytest.raises(RecordRejectedError, match="keeps no version history"):
        await as_of(plain, tmp_path / "r", "2026-01-01T00:00:00Z")
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("DELETE FROM acode.schema_migrations WHERE version >= 8")
    finally:
        await conn.close()
    with pytest.raises(PostgresSchemaMismatchError, match="as of a time needs version 8"):
        await as_of(plain, tmp_path / "r", "2026-01-01T00:00:00Z")


def test_a_bad_as_of_is_refused_with_its_code(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert parse_as_of("2026-01-15T11:30:00.25+01:00") == "2026-01-15T10:30:00.250000Z"
    for bad in ("yesterday", "2026-01-15T10:30:00", "2026-02-30T00:00:00Z"):
        with pytest.raises(RecordRejectedError, match="--as-of"):
            parse_as_of(bad)
    code = main(["db", "restore", "--workspace", str(workspace), "--all", "--as-of", "noon"])
    err = capsys.readouterr().err
    assert code != 0
    assert "ACODE-DB-006: --as-of: 'noon' is not an RFC 3339 timestamp" in err
    assert "hint: Give an RFC 3339 time" in err


def test_history_maintain_command(
    pg_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ACODE_POSTGRES_URL", pg_url)
    assert main(["db", "history", "maintain"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("acode.entity_history: 98 range partitions")
    assert "  created entity_history_p" in out
    assert "created entity_history_default" not in out


async def test_a_version_applied_without_the_history_is_a_gap_never_skipped_over(
    workspace: Path, settings: PostgresSettings, tmp_path: Path
) -> None:
    """v1 shipped with the history, v2 without, v3 with: as of a time between v2 and v3
    the state was v2, which the history lacks; v1 must not stand in for it."""
    clock = SteppingClock()
    off = replace(settings, keep_history=False)
    async with await WorkspaceStore.open(workspace, OpenOptions(clock=clock)) as store:
        clock.at(0)
        session = await store.save(Session(title="v1"))
        task = await store.save(SessionTask(session_id=session.session_id, title="kept"))
        await ship(workspace, settings)
        clock.at(10)
        session = await store.save(replace(session, title="v2"))
        await ship(workspace, off)
        between = clock.at(15)
        clock.at(20)
        await store.save(replace(session, title="v3"))
        await store.save(replace(task, title="kept, then changed"))
        await ship(workspace, settings)
    previous = await fetch(
        settings,
        "SELECT previous_version FROM acode.entity_history WHERE entity_type = 'Session' "
        "ORDER BY version",
    )
    assert [r[0] for r in previous] == [None, START + timedelta(minutes=10)]
    report = await as_of(settings, tmp_path / "r", between)
    assert report.tables["sessions"].unknown_as_of == 1
    assert report.tables["sessions"].restored == 0
    # The task's versions were all shipped with the history: its v1 is found (then skipped:
    # its session is not restored).
    assert (report.tables["session_tasks"].read, report.tables["session_tasks"].skipped) == (1, 1)
    v1 = START
    followed = await fetch(
        settings,
        "SELECT acode.history_followed('SessionTask', $1, $3), "
        "acode.history_followed('Session', $2, $3)",
        task.task_id,
        session.session_id,
        v1,
    )
    assert tuple(followed[0]) == (True, False)


async def test_the_history_of_a_schema_with_tenants_enabled_is_kept_by_tenant(
    pg_url: str,
) -> None:
    """Tenants enabled before the history existed (an older program): migration 8 gives
    the history the same row security, so a syncer role sees and writes only its own
    tenant's versions there too."""
    from acode_sync.migrations import load_migrations
    from acode_sync.postgres import DIALECT
    from acode_sync.roles import ENTITY_TABLES, TENANT_TABLES
    from acode_sync.sql import queries

    sql = queries(DIALECT)
    older = PostgresTarget(PostgresSettings(dsn=pg_url))
    try:
        await older.ensure_schema(load_migrations(DIALECT)[:7])
    finally:
        await older.close()
    conn = await asyncpg.connect(pg_url)
    try:
        for table in TENANT_TABLES:
            if table != "entity_history":  # what enabling tenants did before migration 8
                await conn.execute(sql["enable_tenant_rows"].replace("<t>", table))
        for table in ENTITY_TABLES:
            await conn.execute(sql["enable_tenant_guard"].replace("<t>", table))
    finally:
        await conn.close()
    newer = PostgresTarget(PostgresSettings(dsn=pg_url))
    try:
        await newer.ensure_schema(explicit=True)
    finally:
        await newer.close()
    conn = await asyncpg.connect(pg_url)
    try:
        secured = await conn.fetchval(
            "SELECT relrowsecurity FROM pg_class WHERE oid = 'acode.entity_history'::regclass"
        )
        policies = await conn.fetchval(
            "SELECT count(*) FROM pg_policies WHERE schemaname = 'acode' "
            "AND tablename = 'entity_history' AND policyname = 'tenant_rows'"
        )
    finally:
        await conn.close()
    assert (secured, policies) == (True, 1)
