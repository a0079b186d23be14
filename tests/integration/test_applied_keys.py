"""A batch records its keys with a plain insert, taking them for new: a key applied_keys
already holds (a resend, a copied workspace, a concurrent batch) fails the round, and the
batch runs again finding the keys held, with the same outcome as if it had looked first.
Real PostgreSQL; a second connection plays the concurrent writer."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import asyncpg
import pytest

from acode_sync.config import PostgresSettings
from acode_sync.postgres import PostgresTarget, plan_batch
from tests.records import SESSION_VERSION, prepared_session

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]


def settings(pg_url: str) -> PostgresSettings:
    return PostgresSettings(dsn=pg_url, pool_min=1, pool_max=1)


def target(pg_url: str) -> PostgresTarget:
    return PostgresTarget(settings(pg_url))


@asynccontextmanager
async def two_daemons(
    shared: PostgresSettings,
) -> AsyncIterator[tuple[PostgresTarget, PostgresTarget]]:
    """Two targets with no memory of each other, as two daemons (or one restarted) have."""
    first, second = PostgresTarget(shared), PostgresTarget(shared)
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


async def count(pg_url: str, sql: str) -> int:
    conn = await asyncpg.connect(pg_url)
    try:
        return int(await conn.fetchval(sql))
    finally:
        await conn.close()


async def test_a_resend_is_a_duplicate_and_the_origin_looks_for_held_keys_until_none(
    pg_url: str,
) -> None:
    async with two_daemons(settings(pg_url)) as (first, second):
        sent = [prepared_session(1), prepared_session(2)]
        assert len((await first.apply("origin", plan_batch(sent))).applied) == 2
        # Another daemon (no memory of the first) sends the same records again.
        again = await second.apply("origin", plan_batch(sent))
        assert (len(again.duplicates), again.applied, again.conflicts) == (2, [], [])
        assert again.found_held_keys
        assert "origin" in second._resending
        # Its next batch looks for held keys first; one that finds none ends that.
        mixed = await second.apply("origin", plan_batch([prepared_session(1), prepared_session(3)]))
        assert [r.entity_id for r in mixed.duplicates] == ["sess_1"]
        assert [r.entity_id for r in mixed.applied] == ["sess_3"]
        assert "origin" in second._resending
        fresh = await second.apply("origin", plan_batch([prepared_session(4)]))
        assert [r.entity_id for r in fresh.applied] == ["sess_4"]
        assert not fresh.found_held_keys
        assert "origin" not in second._resending
        assert await count(pg_url, "SELECT count(*) FROM acode.applied_keys") == 4
        assert await count(pg_url, "SELECT count(*) FROM acode.sessions") == 4


async def test_a_key_a_concurrent_transaction_commits_meanwhile_is_judged_as_held(
    pg_url: str,
) -> None:
    # The other transaction holds the same key, with another payload's digest, uncommitted:
    # the plain insert waits for it, then fails on its commit; run again, the batch finds
    # the key held with another digest and applies the record as a tie.
    applier = target(pg_url)
    other = await asyncpg.connect(pg_url)
    try:
        await applier.ensure_schema()
        record = prepared_session(1)
        writer = other.transaction()
        await writer.start()
        await other.execute(
            "INSERT INTO acode.applied_keys (session_id, idempotency_key, version, "
            "payload_digest, origin_id) VALUES ($1, $2, $3::text::timestamptz, $4, 'other')",
            record.session_id, record.idempotency_key, SESSION_VERSION,
            hashlib.sha256(b"other").digest(),
        )  # fmt: skip
        async with anyio.create_task_group() as group:
            outcomes = []

            async def apply() -> None:
                outcomes.append(await applier.apply("origin", plan_batch([record])))

            group.start_soon(apply)
            await anyio.sleep(0.3)
            assert not outcomes  # waiting on the uncommitted key
            await writer.commit()
        (outcome,) = outcomes
        assert [r.entity_id for r in outcome.applied] == ["sess_1"]
        assert outcome.found_held_keys
        title = await other.fetchval("SELECT title FROM acode.sessions WHERE session_id = 'sess_1'")
        assert title == "t"
    finally:
        await other.close()
        await applier.close()


async def test_the_entity_tables_keep_only_their_keys(pg_url: str) -> None:
    applier = target(pg_url)
    conn = await asyncpg.connect(pg_url)
    try:
        await applier.ensure_schema()
        rows = await conn.fetch(
            "SELECT tablename, indexname FROM pg_indexes WHERE schemaname = 'acode' AND "
            "tablename IN ('sessions', 'session_events', 'session_tasks', 'steps', "
            "'tool_calls', 'artifacts') ORDER BY indexname"
        )
        extra = [r["indexname"] for r in rows if not r["indexname"].endswith(("_pkey", "_key"))]
        assert extra == []
        assert len(rows) == 6 * 2 - 1  # a Session's id is its session: one key
    finally:
        await conn.close()
        await applier.close()


async def test_a_connection_prepares_one_round_statement_whatever_keys_it_meets(
    pg_url: str,
) -> None:
    # With a statement cache the round is one statement for every table, prepared once per
    # connection: its plans take megabytes in every backend. A batch that meets keys
    # already held must not make the connection prepare a second one beside it.
    async with two_daemons(settings(pg_url)) as (first, second):
        assert second.settings.statement_cache_size > 0
        assert len((await first.apply("origin", plan_batch([prepared_session(1)]))).applied) == 1
        assert len((await second.apply("origin", plan_batch([prepared_session(2)]))).applied) == 1
        again = await second.apply("origin", plan_batch([prepared_session(1)]))
        assert [r.entity_id for r in again.duplicates] == ["sess_1"]
        pool = await second._get_pool()
        async with pool.acquire() as conn:
            prepared = await conn.fetchval(
                "SELECT count(*) FROM pg_prepared_statements "
                "WHERE statement LIKE 'WITH %INSERT INTO acode.applied_keys%'"
            )
        assert prepared == 1


async def test_a_resend_without_a_statement_cache_is_a_duplicate(pg_url: str) -> None:
    # Behind a transaction-pooling PgBouncer each round names only its tables and its key
    # insert: a plain one first, then the one that finds the keys held.
    uncached = PostgresSettings(dsn=pg_url, pool_min=1, pool_max=1, statement_cache_size=0)
    async with two_daemons(uncached) as (first, second):
        assert len((await first.apply("origin", plan_batch([prepared_session(1)]))).applied) == 1
        again = await second.apply("origin", plan_batch([prepared_session(1), prepared_session(2)]))
        assert [r.entity_id for r in again.duplicates] == ["sess_1"]
        assert [r.entity_id for r in again.applied] == ["sess_2"]
        fresh = await second.apply("other", plan_batch([prepared_session(3)]))
        assert [r.entity_id for r in fresh.applied] == ["sess_3"]
        assert await count(pg_url, "SELECT count(*) FROM acode.applied_keys") == 3
