"""The fleet simulator, bounded: 50 independent daemons through PgBouncer under an agent's
load, and 50 cold starts at once on an empty database. Only the ledger, the migration and
the errors are asserted here; the figures (and their timing targets) are the full runs'
(docs/performance.md)."""

from __future__ import annotations

from collections.abc import Awaitable

import anyio
import asyncpg
import pytest

from acode_sync.config import PostgresSettings
from acode_sync.migrations import latest_version, load_migrations
from acode_sync.postgres import (
    DIALECT,
    LOCK_NAMESPACE,
    MIGRATION_LOCK,
    MIGRATION_POLL_SECONDS,
    PostgresTarget,
)
from tests.fleet.simulate import main

pytestmark = [pytest.mark.postgres, pytest.mark.processes, pytest.mark.timeout(600)]


def test_fifty_daemons_ship_everything_once_through_pgbouncer_without_an_error() -> None:
    report = main(["--scenario", "steady", "--daemons", "50", "--seconds", "20"])
    assert report.checks["all offered load shipped, nothing twice"], report.lines
    assert report.checks["zero errors"], report.lines
    assert report.checks["server connections within the pool"], report.lines


def test_fifty_cold_starts_migrate_once_and_none_fails() -> None:
    report = main(["--scenario", "cold-start", "--daemons", "50"])
    assert report.checks["exactly one daemon applied the migrations"], report.lines
    assert report.checks["none failed"], report.lines
    assert report.checks["every record shipped once"], report.lines


@pytest.mark.anyio
async def test_a_current_schema_is_checked_without_queueing_on_the_migration_lock(
    pg_url: str,
) -> None:
    """A thousand daemons starting at once must not take the migration lock one after the
    other when there is nothing to migrate."""
    settings = PostgresSettings(dsn=pg_url, statement_timeout=5.0)
    first = PostgresTarget(settings)
    try:
        assert (await first.ensure_schema())[0] == 0  # migrated from nothing
    finally:
        await first.close()
    holder = await asyncpg.connect(pg_url)
    later = PostgresTarget(settings)
    try:
        async with holder.transaction():
            await holder.execute(
                "SELECT pg_advisory_xact_lock($1, $2)", LOCK_NAMESPACE, MIGRATION_LOCK
            )
            with anyio.fail_after(3):
                current, latest = await later.ensure_schema()
        assert current == latest
    finally:
        await later.close()
        await holder.close()


@pytest.mark.anyio
async def test_a_daemon_that_waited_for_the_lock_sees_the_migration_committed_meanwhile(
    pg_url: str,
) -> None:
    """Two daemons find an empty database while another holds the migration lock; they
    wait for it without holding a server connection (no waiter on the lock), then one
    migrates; the other, whose connection already looked for the schema, must find it
    (not run the migrations again and fail on tables that exist)."""
    settings = PostgresSettings(dsn=pg_url, pool_max=1, statement_timeout=5.0)
    first, second = PostgresTarget(settings), PostgresTarget(settings)
    holder = await asyncpg.connect(pg_url)
    results: list[tuple[int, int]] = []
    try:
        async with anyio.create_task_group() as tg, holder.transaction():
            await holder.execute(
                "SELECT pg_advisory_xact_lock($1, $2)", LOCK_NAMESPACE, MIGRATION_LOCK
            )
            tg.start_soon(lambda: _keep(results, first.ensure_schema()))
            tg.start_soon(lambda: _keep(results, second.ensure_schema()))
            # Both find the lock taken and look again every half second meanwhile.
            for _ in range(3):
                await anyio.sleep(MIGRATION_POLL_SECONDS)
                assert await _waiting_on_advisory_locks(pg_url) == 0
            assert results == []
        latest = latest_version(load_migrations(DIALECT))
        assert sorted(results) == [(0, latest), (latest, latest)]  # one migrated, none failed
    finally:
        await first.close()
        await second.close()
        await holder.close()


async def _waiting_on_advisory_locks(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            )
        )
    finally:
        await conn.close()


async def _keep(results: list[tuple[int, int]], call: Awaitable[tuple[int, int]]) -> None:
    results.append(await call)
