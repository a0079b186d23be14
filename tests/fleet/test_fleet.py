"""The fleet simulator, bounded: 50 independent daemons through PgBouncer under an agent's
load, and 50 cold starts at once on an empty database. Only the ledger, the migration and
the errors are asserted here; the figures (and their timing targets) are the full runs'
(docs/performance.md)."""

from __future__ import annotations

import anyio
import asyncpg
import pytest

from acode_sync.config import PostgresSettings
from acode_sync.postgres import LOCK_NAMESPACE, MIGRATION_LOCK, PostgresTarget
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
