"""Partition maintenance on a real range-partitioned PostgreSQL table."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import anyio
import asyncpg
import pytest

from acode_sync.partitions import (
    PARTITION_LOCK_NAMESPACE,
    MaintenanceReport,
    PartitionSpec,
    Period,
    drop_expired,
    ensure,
    list_partitions,
    maintain,
)

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

NOW = datetime(2026, 3, 10, 15, 30, tzinfo=UTC)
DAYS = PartitionSpec("t", "events", "at", Period.DAY, timedelta(days=5), ahead=2)


@pytest.fixture
async def conn(pg_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(pg_url)
    await connection.execute(
        "CREATE SCHEMA t; CREATE TABLE t.events (id bigint, at timestamptz NOT NULL, "
        "note text DEFAULT 'n', PRIMARY KEY (id, at)) PARTITION BY RANGE (at)"
    )
    try:
        yield connection
    finally:
        await connection.close()


def _day(day: int) -> datetime:
    return datetime(2026, 3, day, tzinfo=UTC)


async def _names(conn: asyncpg.Connection, spec: PartitionSpec = DAYS) -> list[str]:
    return [p.name for p in await list_partitions(conn, spec)]


async def test_ensure_covers_the_retention_and_the_periods_ahead_once(
    conn: asyncpg.Connection,
) -> None:
    created = await ensure(conn, DAYS, NOW)
    expected = [f"events_p202603{d:02d}" for d in range(5, 13)]  # cutoff 5th .. 10th + 2
    assert created == ["events_default", *expected]
    assert await _names(conn) == [*expected, "events_default"]
    assert await ensure(conn, DAYS, NOW) == []
    partitions = await list_partitions(conn, DAYS)
    assert (partitions[0].start, partitions[0].end) == (_day(5), _day(6))
    # The bounds are PostgreSQL's: a row lands in the partition named after its day.
    await conn.execute(
        "INSERT INTO t.events (id, at) VALUES (1, $1)", _day(7) + timedelta(hours=23)
    )
    assert await conn.fetchval("SELECT count(*) FROM t.events_p20260307") == 1
    assert await conn.fetchval("SELECT note FROM t.events_p20260307") == "n"


async def test_a_row_outside_every_range_waits_in_the_default_partition_then_moves(
    conn: asyncpg.Connection,
) -> None:
    await ensure(conn, DAYS, NOW)
    later = _day(20)
    await conn.execute("INSERT INTO t.events (id, at) VALUES (1, $1), (2, $2)", later, _day(1))
    report = await maintain(conn, DAYS, NOW)
    assert report.outside_rows == 2
    report = await maintain(conn, DAYS, later)  # the 20th's partition is created
    assert "events_p20260320" in report.created
    assert await conn.fetchval("SELECT count(*) FROM t.events_p20260320") == 1
    assert report.outside_rows == 1  # the 1st: older than every partition, left alone
    assert await conn.fetchval("SELECT count(*) FROM t.events") == 2
    # The moved row kept its key: a second insert of it is refused by the partition.
    with pytest.raises(asyncpg.UniqueViolationError):
        await conn.execute("INSERT INTO t.events (id, at) VALUES (1, $1)", later)


async def test_drop_expired_drops_whole_partitions_past_the_retention_only(
    conn: asyncpg.Connection,
) -> None:
    await ensure(conn, DAYS, NOW)
    await conn.execute(
        "INSERT INTO t.events (id, at) SELECT d, $1::timestamptz + d * interval '1 day' "
        "FROM generate_series(0, 7) AS d",
        _day(5),
    )
    await conn.execute(
        "CREATE TABLE t.events_archive PARTITION OF t.events FOR VALUES "
        "FROM ('2000-01-01+00') TO ('2000-01-02+00')"
    )
    later = NOW + timedelta(days=3)  # cutoff: the 8th, 15:30
    dropped = await drop_expired(conn, DAYS, later)
    assert dropped == ["events_p20260305", "events_p20260306", "events_p20260307"]
    # The partition holding the cutoff is kept whole; one not named by the module stays.
    assert await conn.fetchval("SELECT min(at) FROM t.events") == _day(8)
    assert "events_archive" in await _names(conn)
    assert await drop_expired(conn, DAYS, later) == []
    # ensure does not bring a dropped partition back.
    assert await ensure(conn, DAYS, later) == [f"events_p202603{d}" for d in (13, 14, 15)]
    report = await maintain(conn, DAYS, later)
    assert report.horizon == _day(8)
    assert report.created == report.dropped == []


async def test_months(conn: asyncpg.Connection) -> None:
    spec = PartitionSpec("t", "events", "at", Period.MONTH, timedelta(days=40), ahead=1)
    created = await ensure(conn, spec, datetime(2026, 12, 31, 23, 59, tzinfo=UTC))
    assert created == ["events_default", "events_p202611", "events_p202612", "events_p202701"]
    partitions = await list_partitions(conn, spec)
    assert partitions[-2].end == datetime(2027, 2, 1, tzinfo=UTC)
    await conn.execute("INSERT INTO t.events (id, at) VALUES (1, '2027-01-31T23:59:59Z')")
    assert await conn.fetchval("SELECT count(*) FROM t.events_p202701") == 1


async def test_two_maintainers_at_once_create_each_partition_once(
    pg_url: str, conn: asyncpg.Connection
) -> None:
    holder = await asyncpg.connect(pg_url)
    results: list[list[str]] = []
    failures: list[BaseException] = []

    async def maintainer() -> None:
        other = await asyncpg.connect(pg_url)
        try:
            results.append(await ensure(other, DAYS, NOW))
        except BaseException as error:
            failures.append(error)
        finally:
            await other.close()

    lock = "hashtext('t.events')"
    try:
        # A session lock on the maintainers' key (the same key as their transaction lock).
        await holder.execute(f"SELECT pg_advisory_lock($1, {lock})", PARTITION_LOCK_NAMESPACE)
        async with anyio.create_task_group() as tg:
            tg.start_soon(maintainer)
            tg.start_soon(maintainer)
            # Both wait on the lock before it is released: they truly run at once.
            waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            while await holder.fetchval(waiting) < 2:  # noqa: ASYNC110 - PostgreSQL's state
                await anyio.sleep(0.01)
            await holder.execute(f"SELECT pg_advisory_unlock($1, {lock})", PARTITION_LOCK_NAMESPACE)
    finally:
        await holder.close()
    assert failures == []
    assert sorted(len(r) for r in results) == [0, 9]
    assert len(await _names(conn)) == 9


def test_periods_and_specs() -> None:
    assert Period.MONTH.following(datetime(2026, 12, 1, tzinfo=UTC)) == datetime(
        2027, 1, 1, tzinfo=UTC
    )
    assert Period.DAY.start(datetime(2026, 3, 1, 1, tzinfo=UTC) - timedelta(hours=2)) == datetime(
        2026, 2, 28, tzinfo=UTC
    )
    assert Period.DAY.parse_suffix("20260230") is None
    assert Period.MONTH.parse_suffix("2026013") is None
    assert Period.MONTH.parse_suffix("202601") == datetime(2026, 1, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="identifier"):
        PartitionSpec("t", "Events; DROP", "at", Period.DAY, timedelta(days=1))
    with pytest.raises(ValueError, match="retention"):
        PartitionSpec("t", "events", "at", Period.DAY, timedelta(0))


async def test_the_servers_clock_by_default(conn: asyncpg.Connection) -> None:
    server_now: datetime = await conn.fetchval("SELECT now()")
    await ensure(conn, DAYS)
    today = DAYS.partition_name(Period.DAY.start(server_now))
    assert today in await _names(conn)
    assert (
        MaintenanceReport("t.events").lines()[0].startswith("t.events: 0 range partitions (none)")
    )
    report = await maintain(conn, DAYS)
    assert report.lines()[0].startswith("t.events: 8 range partitions (events_p")
