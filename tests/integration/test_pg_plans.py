"""Batch statements keep their plans: made once on a connection, reused as tables grow.

A plan made while a table is empty must still look each record up by primary key once
the table holds many rows; a scan of the whole table per batch would make every batch
slower as PostgreSQL fills up.
"""

from __future__ import annotations

from datetime import timedelta

import asyncpg
import pytest

from acode_sync.config import PostgresSettings
from acode_sync.outbox import OutboxRecord
from acode_sync.postgres import PostgresTarget, plan_batch
from acode_sync.sync import prepare

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

SKEW = timedelta(minutes=5)
LATEST = "9999-12-31T23:59:59.999999Z"
ROWS_ADDED = 20_000


def session_records(first: int, count: int, stamp: str) -> list[OutboxRecord]:
    return [
        OutboxRecord(
            n,
            f"Session:sess_{n:06d}:{stamp}",
            "Session",
            f"sess_{n:06d}",
            f"sess_{n:06d}",
            f'{{"session_id": "sess_{n:06d}", "updated_at": "{stamp}"}}'.encode(),
            None,
            stamp,
            0,
        )
        for n in range(first, first + count)
    ]


async def sequential_reads(pg_url: str) -> int:
    conn = await asyncpg.connect(pg_url)
    try:
        value = await conn.fetchval(
            "SELECT coalesce(seq_tup_read, 0) FROM pg_stat_user_tables "
            "WHERE schemaname = 'acode' AND relname = 'sessions'"
        )
        return int(value)
    finally:
        await conn.close()


async def test_a_plan_made_on_an_empty_table_still_probes_by_key(pg_url: str) -> None:
    target = PostgresTarget(PostgresSettings(dsn=pg_url, pool_max=1))
    try:
        stamp = "2026-01-15T10:30:00.000000Z"
        for round_ in range(6):  # past the 5 custom plans PostgreSQL may try first
            records = session_records(round_ * 10, 10, stamp)
            ready = [
                prepare(r, max_payload_bytes=10_000, latest=LATEST, skew=SKEW) for r in records
            ]
            await target.apply("origin-a", plan_batch(ready))
        conn = await asyncpg.connect(pg_url)
        try:
            await conn.execute(
                "INSERT INTO acode.sessions (session_id, state, created_at, updated_at, "
                "origin_id, idempotency_key) "
                "SELECT 'bulk_' || g, 'CREATED', now(), now(), 'bulk', 'k' || g "
                "FROM generate_series(1, $1) AS g",
                ROWS_ADDED,
            )
        finally:
            await conn.close()
        later = "2026-01-15T10:31:00.000000Z"
        updates = session_records(0, 10, later) + session_records(1_000, 10, later)
        ready = [prepare(r, max_payload_bytes=10_000, latest=LATEST, skew=SKEW) for r in updates]
        before = await sequential_reads(pg_url)
        outcome = await target.apply("origin-a", plan_batch(ready))
        assert len(outcome.applied) == 20
    finally:
        await target.close()  # the backend's statistics are flushed when it exits
    assert await sequential_reads(pg_url) - before < ROWS_ADDED
