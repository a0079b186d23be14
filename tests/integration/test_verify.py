"""`acode db verify` against the real PostgreSQL and real workspace files: what differs,
what is only in flight, and `--repair` through the ordinary outbox."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import asyncpg
import pytest

from acode_sync.config import PostgresSettings, SyncSettings
from acode_sync.domain import Session, SessionEvent, SessionState, SessionTask, Step, ToolCall
from acode_sync.errors import SchemaMismatchError
from acode_sync.postgres import PostgresTarget
from acode_sync.store import WorkspaceDatabase, WorkspaceStore
from acode_sync.sync import WorkspaceSyncer
from acode_sync.verify import Kind, Verifier, VerifyReport
from acode_sync.workspace import OpenOptions, database_path

pytestmark = [pytest.mark.postgres, pytest.mark.anyio]


@pytest.fixture
async def target(pg_url: str) -> AsyncIterator[PostgresTarget]:
    t = PostgresTarget(PostgresSettings(dsn=pg_url, pool_max=4))
    try:
        yield t
    finally:
        await t.close()


async def drain(workspace: Path, target: PostgresTarget) -> None:
    await WorkspaceSyncer(workspace=workspace, target=target, settings=SyncSettings()).drain(
        lock_wait=10
    )


async def verify(workspace: Path, target: PostgresTarget, **kw: object) -> VerifyReport:
    page_size = int(kw.pop("page_size", 3))  # type: ignore[call-overload]
    return await Verifier(workspace=workspace, target=target, page_size=page_size).run(
        **kw  # type: ignore[arg-type]
    )


def kinds(report: VerifyReport) -> dict[str, set[str]]:
    return {k: {d.entity_id for d in v} for k, v in report.by_kind().items() if v}


async def pg(url: str, sql: str, *args: object) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql, *args)
    finally:
        await conn.close()


def seed(workspace: Path, sessions: int) -> list[Session]:
    db = WorkspaceDatabase(workspace)
    try:
        saved = [
            db.save(Session(title=f"s{i}", metadata={"n": i, "text": "é\n\u2028"}))
            for i in range(sessions)
        ]
        db.save(SessionEvent(session_id=saved[0].session_id, event_type="e", payload=[1.5, None]))
        return saved
    finally:
        db.close()


async def test_equal_then_each_kind_of_difference_then_repair(
    workspace: Path, target: PostgresTarget, pg_url: str
) -> None:
    sessions = seed(workspace, 7)
    await drain(workspace, target)
    report = await verify(workspace, target)
    assert report.ok
    assert report.problems == []
    assert (report.checked, report.equal, report.in_flight) == (8, 8, 0)

    missing, stale, corrupt, superseded, ahead = (s.session_id for s in sessions[:5])
    db = WorkspaceDatabase(workspace)
    db.save(Session(session_id=stale, title="newer"))
    db.save(Session(session_id=ahead, title="newer, shipped"))
    await drain(workspace, target)
    in_flight = db.save(Session(title="not shipped yet"))
    db.close()
    await pg(pg_url, "DELETE FROM acode.sessions WHERE session_id = $1", missing)
    # PostgreSQL holds the version before the last (as a backup taken in between would).
    old = sessions[2]
    await pg(
        pg_url,
        "UPDATE acode.sessions SET updated_at = $2::text::timestamptz, title = 's2', "
        "idempotency_key = 'Session:' || session_id || ':' || $2 WHERE session_id = $1",
        stale,
        old.updated_at,
    )
    await pg(
        pg_url, "UPDATE acode.sessions SET payload_digest = '\\x00' WHERE session_id = $1", corrupt
    )
    for entity_id, origin in ((superseded, "another-origin"), (ahead, None)):
        await pg(
            pg_url,
            "UPDATE acode.sessions SET updated_at = updated_at + interval '1 hour', "
            "origin_id = coalesce($2, origin_id) WHERE session_id = $1",
            entity_id,
            origin,
        )

    report = await verify(workspace, target)
    assert kinds(report) == {
        Kind.MISSING: {missing},
        Kind.STALE: {stale},
        Kind.DIGEST_DIFFERS: {corrupt},
        Kind.SUPERSEDED: {superseded},
        Kind.NEWER_CENTRALLY: {ahead},
    }
    assert report.in_flight == 1
    assert not report.ok
    assert len(report.problems) == 4
    assert in_flight.session_id not in {d.entity_id for d in report.differences}
    text = "\n".join(report.lines())
    assert f"missing: 1\n  Session {missing}: local {sessions[0].updated_at}" in text
    assert "superseded: 1 (expected: last write wins)" in text
    assert text.endswith("4 difference(s)")
    as_json = report.as_dict()
    assert as_json["ok"] is False
    assert as_json["differences"]["superseded"][0]["central_origin"] == "another-origin"

    repaired = await verify(workspace, target, repair=True)
    assert repaired.queued == 2  # missing and stale: the others are not the outbox's to fix
    await drain(workspace, target)
    after = await verify(workspace, target)
    assert kinds(after) == {
        Kind.DIGEST_DIFFERS: {corrupt},
        Kind.SUPERSEDED: {superseded},
        Kind.NEWER_CENTRALLY: {ahead},
    }
    assert after.in_flight == 0  # the unshipped session went out with the repair's drain


async def test_repair_rebuilds_records_that_were_pruned(
    workspace: Path, target: PostgresTarget, pg_url: str
) -> None:
    """Records gone from the outbox: the digest is that of the row as the store encodes it
    (equal to the one shipped), and a repair writes a new record for the current version."""
    sessions = seed(workspace, 4)
    db = WorkspaceDatabase(workspace)
    step_session = sessions[1].session_id
    task = db.save(SessionTask(session_id=step_session))
    step = db.save(Step(session_id=step_session, task_id=task.task_id, description="d"))
    db.save(
        ToolCall(
            session_id=step_session, step_id=step.step_id, name="n", arguments={"a": [1, 2.5e300]}
        )
    )
    db.close()
    await drain(workspace, target)
    conn = sqlite3.connect(database_path(workspace))
    conn.execute("DELETE FROM outbox")
    conn.commit()
    conn.close()
    assert (await verify(workspace, target)).ok  # the rebuilt payloads match the digests

    gone = sessions[3].session_id
    await pg(pg_url, "DELETE FROM acode.sessions WHERE session_id = $1", gone)
    report = await verify(workspace, target, repair=True)
    assert kinds(report) == {Kind.MISSING: {gone}}
    assert report.queued == 1
    await drain(workspace, target)
    assert (await verify(workspace, target)).ok


async def test_dead_letter_and_an_entity_saved_before_the_repair(
    workspace: Path, target: PostgresTarget, pg_url: str
) -> None:
    sessions = seed(workspace, 3)
    await drain(workspace, target)
    dead, moved = sessions[0].session_id, sessions[1].session_id
    db = WorkspaceDatabase(workspace)
    db.save(Session(session_id=dead, title="never shipped"))
    db.close()
    conn = sqlite3.connect(database_path(workspace))
    conn.execute(
        "UPDATE outbox SET state = 'dead' WHERE entity_id = ? AND state = 'pending'", (dead,)
    )
    conn.commit()
    conn.close()
    await pg(pg_url, "DELETE FROM acode.sessions WHERE session_id = $1", moved)
    report = await verify(workspace, target)
    assert kinds(report) == {Kind.DEAD_LETTER: {dead}, Kind.MISSING: {moved}}

    # Saved again between the verify and the repair: its new record ships it already.
    db = WorkspaceDatabase(workspace)
    db.save(Session(session_id=moved, title="saved since"))
    db.close()
    verifier = Verifier(workspace=workspace, target=target)
    assert await verifier._repair(report.problems) == 0


async def test_refuses_a_workspace_at_another_schema(
    workspace: Path, target: PostgresTarget
) -> None:
    seed(workspace, 1)
    conn = sqlite3.connect(database_path(workspace))
    conn.execute(
        "DELETE FROM schema_migrations WHERE version = (SELECT max(version) FROM schema_migrations)"
    )
    conn.commit()
    conn.close()
    with pytest.raises(SchemaMismatchError):
        await verify(workspace, target)


class UnhurriedReads(PostgresTarget):
    """The real PostgreSQL, read a moment after the workspace's page: room for the agent
    to save and the syncer to ship in between, as on a loaded machine."""

    async def entity_versions(self, entity_type: str, entity_ids: Sequence[str]) -> list[Any]:
        await anyio.sleep(0.02)
        return await super().entity_versions(entity_type, entity_ids)


async def test_no_false_alarm_while_agents_write_and_a_syncer_ships(
    workspace: Path, target: PostgresTarget, pg_url: str
) -> None:
    """Saves and a running drain during every verify: nothing in flight is reported."""
    sessions = seed(workspace, 60)
    await drain(workspace, target)
    ids = [s.session_id for s in sessions]
    rng = random.Random(14)
    stop = anyio.Event()
    saves = 0

    async def agent() -> None:
        nonlocal saves
        options = OpenOptions(busy_timeout=10)
        async with await WorkspaceStore.open(workspace, options) as store:
            while not stop.is_set():
                entity_id = rng.choice(ids)
                state = rng.choice([SessionState.CREATED, SessionState.CREATED])
                await store.save(Session(session_id=entity_id, state=state, title=str(saves)))
                if saves % 5 == 0:
                    new = await store.save(Session(title="new"))
                    ids.append(new.session_id)
                saves += 1
                await anyio.lowlevel.checkpoint()

    async def syncer() -> None:
        settings = SyncSettings(batch_max_records=7)
        shipper = WorkspaceSyncer(workspace=workspace, target=target, settings=settings)
        while not stop.is_set():
            await shipper.drain(lock_wait=10)
            await anyio.sleep(0.005)

    reports: list[VerifyReport] = []
    reader = UnhurriedReads(PostgresSettings(dsn=pg_url, pool_max=2))
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(agent)
            tg.start_soon(syncer)
            for _ in range(5):
                reports.append(await verify(workspace, reader, page_size=4))
            stop.set()
    finally:
        await reader.close()
    assert saves > 50
    assert sum(r.in_flight for r in reports) > 0  # records were in flight during verifies
    assert [r.problems for r in reports] == [[]] * len(reports)
    await drain(workspace, target)
    final = await verify(workspace, target)
    assert final.ok
    assert final.in_flight == 0
    assert final.checked == len(ids) + 1
