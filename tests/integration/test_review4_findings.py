"""A batch's hand-made transaction (BEGIN in the opening, COMMIT or _roll_back) under
cancellation and lost links: no connection goes back to the pool inside a transaction.
Real PostgreSQL, a real TCP proxy; asyncpg reports a pooled connection released in a
transaction through the loop's exception handler ("Resetting connection with an active
transaction"), which these tests collect."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import anyio
import asyncpg
import pytest

from acode_sync.config import PostgresSettings
from acode_sync.errors import PostgresUnavailableError
from acode_sync.postgres import LOCK_NAMESPACE, PostgresTarget, plan_batch
from tests.faults import AtNth
from tests.proxy import TcpProxy
from tests.records import SESSION_VERSION, prepared_session

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]


@pytest.fixture
async def reports() -> AsyncIterator[list[str]]:
    loop = asyncio.get_running_loop()
    seen: list[str] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: seen.append(str(context.get("message"))))
    yield seen
    loop.set_exception_handler(previous)


async def test_a_batch_cancelled_while_its_opening_waits_for_a_lock_is_rolled_back_by_us(
    pg_url: str, reports: list[str]
) -> None:
    # Daemon shutdown while another batch of the session holds its advisory lock: the
    # opening (BEGIN; settings; locks) is in flight, so the client still reads the
    # connection as idle; _roll_back must not take that for "nothing to roll back".
    target = PostgresTarget(PostgresSettings(dsn=pg_url, pool_min=1, pool_max=1))
    other = await asyncpg.connect(pg_url)
    try:
        await target.ensure_schema()
        plan = plan_batch([prepared_session(1)])
        holder = other.transaction()
        await holder.start()
        await other.execute("SELECT pg_advisory_xact_lock($1, $2)", LOCK_NAMESPACE, plan.locks[0])
        with anyio.move_on_after(0.3) as scope:
            await target.apply("origin", plan)
        assert scope.cancelled_caught
        await anyio.sleep(0.2)  # the pool's release runs on after the cancellation
        await holder.rollback()
        assert len((await target.apply("origin", plan)).applied) == 1
        assert not [r for r in reports if "active transaction" in r], reports
    finally:
        await other.close()
        await target.close()


@pytest.mark.parametrize("fault", ["cut", "blackhole"])
async def test_a_link_lost_at_commit_rolls_back_and_the_next_batch_ships(
    pg_url: str, reports: list[str], fault: str
) -> None:
    proxy = TcpProxy().start()
    settings = PostgresSettings(
        dsn=proxy.dsn(pg_url), pool_min=1, pool_max=1, statement_timeout=1.0, connect_timeout=1.0
    )
    target = PostgresTarget(settings)
    try:
        await target.ensure_schema()
        hook = AtNth("before_commit", 1, proxy.cut if fault == "cut" else proxy.blackhole)
        with pytest.raises(PostgresUnavailableError):
            await target.apply("origin", plan_batch([prepared_session(1)]), fault_hook=hook)
        proxy.restore()
        outcome = await target.apply(
            "origin", plan_batch([prepared_session(1), prepared_session(2)])
        )
        # A COMMIT the stalled link delivers late may have committed: then a duplicate.
        assert sorted(r.outbox_id for r in outcome.applied + outcome.duplicates) == [1, 2]
        assert not [r for r in reports if "active transaction" in r], reports
    finally:
        await target.close()
        proxy.stop()


async def _hold_migration_lock(
    url: str,
) -> tuple[asyncpg.Connection, asyncpg.transaction.Transaction]:
    from acode_sync.postgres import MIGRATION_LOCK

    conn = await asyncpg.connect(url)
    holding = conn.transaction()
    await holding.start()
    await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", LOCK_NAMESPACE, MIGRATION_LOCK)
    return conn, holding


async def test_a_daemon_polling_a_held_migration_lock_gives_up_with_its_message(
    pg_url: str,
) -> None:
    conn, holding = await _hold_migration_lock(pg_url)
    target = PostgresTarget(PostgresSettings(dsn=pg_url, statement_timeout=0.5))
    try:
        with pytest.raises(PostgresUnavailableError, match="held the migration lock that long"):
            await target.ensure_schema()
    finally:
        await holding.rollback()
        await conn.close()
        await target.close()


async def test_a_migration_that_failed_elsewhere_is_run_by_the_poller_once(pg_url: str) -> None:
    # The lock's holder gives up without migrating (its migration failed and rolled back):
    # the poller takes the lock and migrates, once.
    conn, holding = await _hold_migration_lock(pg_url)
    target = PostgresTarget(PostgresSettings(dsn=pg_url, statement_timeout=5.0))
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(target.ensure_schema)
            await anyio.sleep(1.2)
            await holding.rollback()
        versions = await conn.fetch("SELECT version FROM acode.schema_migrations")
        assert len(versions) == len({v["version"] for v in versions}) >= 8
    finally:
        await conn.close()
        await target.close()


@pytest.mark.processes
async def test_through_pgbouncer_a_batch_cancelled_in_its_opening_leaves_no_open_transaction(
    pg_url: str, reports: list[str]
) -> None:
    from tests.bouncer import pgbouncer

    with pgbouncer(("127.0.0.1", 5432), default_pool_size=1) as bouncer:
        settings = PostgresSettings(
            dsn=bouncer.url(pg_url), pool_max=1, statement_cache_size=0, statement_timeout=5.0
        )
        target = PostgresTarget(settings)
        other = await asyncpg.connect(pg_url)
        try:
            await target.ensure_schema()
            plan = plan_batch([prepared_session(1)])
            holder = other.transaction()
            await holder.start()
            await other.execute(
                "SELECT pg_advisory_xact_lock($1, $2)", LOCK_NAMESPACE, plan.locks[0]
            )
            with anyio.move_on_after(0.3):
                await target.apply("origin", plan)
            await anyio.sleep(0.3)
            await holder.rollback()
            assert len((await target.apply("origin", plan)).applied) == 1
            assert not [r for r in reports if "active transaction" in r], reports
            stuck = await other.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND state LIKE 'idle in transaction%'"
            )
            assert stuck == 0
        finally:
            await other.close()
            await target.close()


async def test_a_batch_chosen_as_a_deadlock_victim_is_run_again_at_once(
    pg_url: str, reports: list[str]
) -> None:
    target = PostgresTarget(PostgresSettings(dsn=pg_url, pool_min=1, pool_max=1))
    other = await asyncpg.connect(pg_url)
    try:
        await target.ensure_schema()
        await target.apply("origin", plan_batch([prepared_session(1), prepared_session(2)]))
        newer = "2026-12-01T00:00:01.000000Z"
        plan = plan_batch([prepared_session(1, newer), prepared_session(2, newer)])
        deadlocks = "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
        before = await other.fetchval(deadlocks)
        holding = other.transaction()
        await holding.start()
        await other.execute("SELECT FROM acode.sessions WHERE session_id = 'sess_2' FOR UPDATE")
        outcome = None

        async def batch() -> None:
            nonlocal outcome
            outcome = await target.apply("origin", plan)

        async with anyio.create_task_group() as tg:
            tg.start_soon(batch)
            await anyio.sleep(0.3)  # the batch holds sess_1 and waits for sess_2
            # The batch waited first: its deadlock check fires first, so it is the victim
            # (40P01), rolled back, and this gets sess_1.
            await other.execute("SELECT FROM acode.sessions WHERE session_id = 'sess_1' FOR UPDATE")
            await holding.rollback()
        assert outcome is not None
        assert len(outcome.applied) == 2
        await anyio.sleep(0.6)  # the statistics collector's flush
        assert await other.fetchval(deadlocks) == before + 1
        assert not [r for r in reports if "active transaction" in r], reports
    finally:
        await other.close()
        await target.close()


@pytest.mark.parametrize(
    "payload",
    [
        b'{"name": "grep", "meta": {"session_id": "sess_x"}}',  # nested: not the entity's
        b'{"name": "grep", "session_id": null}',
        b'{"name": "grep", "note": "session_id", "tags": ["session_id"]}',
    ],
)
async def test_a_record_whose_payload_names_no_session_of_its_own_is_refused_before_it_ships(
    pg_url: str, payload: bytes
) -> None:
    # The byte scan takes any "session_id" for the entity's session; PostgreSQL reads only
    # the top-level string (coalesce(p->>'session_id', record's)). These records then fail
    # there, as the dead letter with PostgreSQL's not-null text that the check was for.
    from acode_sync.errors import RecordRejectedError
    from acode_sync.outbox import OutboxRecord
    from acode_sync.postgres import RecordFailure
    from acode_sync.sync import prepare

    key = f"ToolCall:tc_1:{SESSION_VERSION}"
    orphan = OutboxRecord(1, key, "ToolCall", "tc_1", None, payload, None, SESSION_VERSION, 0)
    try:
        prepared = prepare(orphan, max_payload_bytes=1000, latest="2099-01-01T00:00:00.000000Z",
                           skew=__import__("datetime").timedelta(minutes=5))  # fmt: skip
    except RecordRejectedError:
        return
    target = PostgresTarget(PostgresSettings(dsn=pg_url))
    try:
        await target.ensure_schema()
        with pytest.raises(RecordFailure) as failed:
            await target.apply("origin", plan_batch([prepared]))
        pytest.fail(f"prepare let through a record PostgreSQL refuses: {failed.value}")
    finally:
        await target.close()


@pytest.mark.processes
async def test_pgbouncers_server_link_lost_at_commit_leaves_the_next_batch_clean(
    pg_url: str, reports: list[str]
) -> None:
    from tests.bouncer import pgbouncer

    with TcpProxy() as proxy, pgbouncer(("127.0.0.1", proxy.port), default_pool_size=1) as pgb:
        settings = PostgresSettings(
            dsn=pgb.url(pg_url), pool_max=1, statement_cache_size=0, connect_timeout=2.0
        )
        target = PostgresTarget(settings)
        try:
            await target.ensure_schema()
            hook = AtNth("before_commit", 1, proxy.cut)
            with pytest.raises(PostgresUnavailableError):
                await target.apply("origin", plan_batch([prepared_session(1)]), fault_hook=hook)
            outcome = await target.apply(
                "origin", plan_batch([prepared_session(1), prepared_session(2)])
            )
            assert sorted(r.outbox_id for r in outcome.applied) == [1, 2]
            assert not [r for r in reports if "active transaction" in r], reports
        finally:
            await target.close()


async def test_a_read_only_server_refuses_the_batch_as_the_servers_fault_not_the_records(
    pg_url: str, reports: list[str]
) -> None:
    from acode_sync.errors import PostgresRefusedError

    target = PostgresTarget(PostgresSettings(dsn=pg_url, pool_min=1, pool_max=1))
    admin = await asyncpg.connect(pg_url)
    database = await admin.fetchval("SELECT current_database()")
    try:
        await target.ensure_schema()
        await admin.execute(f'ALTER DATABASE "{database}" SET default_transaction_read_only = on')
        await target._get_pool()
        assert target._pool is not None
        await target._pool.expire_connections()
        with pytest.raises(PostgresRefusedError) as refused:
            await target.apply("origin", plan_batch([prepared_session(1)]))
        assert refused.value.sqlstate == "25006"
        await admin.execute(f'ALTER DATABASE "{database}" RESET default_transaction_read_only')
        assert len((await target.apply("origin", plan_batch([prepared_session(1)]))).applied) == 1
        assert not [r for r in reports if "active transaction" in r], reports
    finally:
        await admin.close()
        await target.close()


async def test_bisection_on_a_pool_of_one_leaves_no_transaction_behind(
    workspace: object, pg_url: str, reports: list[str]
) -> None:
    import json
    from datetime import UTC, datetime, timedelta
    from pathlib import Path

    from acode_sync.config import SyncSettings
    from acode_sync.domain import Session, format_timestamp
    from acode_sync.store import WorkspaceDatabase
    from acode_sync.sync import WorkspaceSyncer
    from tests.integration.test_sync_faults import insert_raw
    from tests.records import session_payload

    assert isinstance(workspace, Path)
    db = WorkspaceDatabase(workspace)
    stamp = format_timestamp(datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1))
    try:
        for n in range(7):
            db.save(Session(title=f"good {n}"))
            if n == 3:
                payload = json.dumps(session_payload("sess_bad", stamp, state="NOPE"))
                insert_raw(workspace, "Session", "sess_bad", "sess_bad", stamp, payload)
    finally:
        db.close()
    target = PostgresTarget(PostgresSettings(dsn=pg_url, pool_min=1, pool_max=1))
    watcher = await asyncpg.connect(pg_url)
    try:
        summary = await WorkspaceSyncer(
            workspace=workspace, target=target, settings=SyncSettings()
        ).drain()
        assert (summary.applied, summary.retried) == (7, 1)
        assert not [r for r in reports if "active transaction" in r], reports
        stuck = await watcher.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND state LIKE 'idle in transaction%'"
        )
        assert stuck == 0
    finally:
        await watcher.close()
        await target.close()
