"""Every version delivered keeps its key and digest: the version an entity holds in its
row; a version it replaced, and a version that lost, in applied_keys, written by the round
that replaces it or that it loses. A resend of any is a duplicate, never a conflict,
whoever sends it and whenever; a losing record whose row, or whose conflict, another
transaction writes under the round is judged again. Real PostgreSQL; a second connection
plays the concurrent writer."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import asyncpg
import pytest
from asyncpg.transaction import Transaction

from acode_sync.config import PostgresSettings
from acode_sync.postgres import BatchOutcome, PostgresTarget, PreparedRecord, plan_batch
from tests.records import SESSION_VERSION, prepared_session

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

LATER = "2026-12-01T00:00:01.000000Z"


def settings(pg_url: str, statement_cache_size: int = 100) -> PostgresSettings:
    return PostgresSettings(
        dsn=pg_url, pool_min=1, pool_max=1, statement_cache_size=statement_cache_size
    )


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


def session_version(version: str, title: str, base: str | None = None) -> PreparedRecord:
    """sess_1 at `version` with this title, based on `base`."""
    payload = f'{{"title": "{title}", "updated_at": "{version}"}}'.encode()
    return PreparedRecord(
        1, f"Session:sess_1:{version}", "Session", "sess_1", "sess_1", payload, version, base,
        hashlib.sha256(payload).digest(),
    )  # fmt: skip


async def fetch(pg_url: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(pg_url)
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


async def kept_keys(pg_url: str) -> list[tuple[str, bytes, str]]:
    rows = await fetch(
        pg_url,
        "SELECT idempotency_key, payload_digest, origin_id FROM acode.applied_keys ORDER BY 1",
    )
    return [(r[0], r[1], r[2]) for r in rows]


async def resent_until_commit(
    applier: PostgresTarget, origin: str, record: PreparedRecord, writer: Transaction
) -> BatchOutcome:
    """`record` sent again while `writer`, holding its row, is still open: the round waits
    on the row; then `writer` commits, and the round's outcome is returned."""
    outcomes = []

    async def resend() -> None:
        outcomes.append(await applier.apply(origin, plan_batch([record])))

    async with anyio.create_task_group() as group:
        group.start_soon(resend)
        await anyio.sleep(0.3)
        assert not outcomes  # the round waits on the row
        await writer.commit()
    (outcome,) = outcomes
    return outcome


@pytest.mark.parametrize("statement_cache_size", [100, 0])
async def test_a_resend_of_new_and_replaced_versions_is_a_duplicate(
    pg_url: str, statement_cache_size: int
) -> None:
    # Without a statement cache (behind a transaction-pooling PgBouncer) each round names
    # only its tables: the same judgment.
    first_version = session_version(SESSION_VERSION, "first")
    second_version = session_version(LATER, "second", base=SESSION_VERSION)
    batch = [first_version, second_version, prepared_session(2)]
    async with two_daemons(settings(pg_url, statement_cache_size=statement_cache_size)) as (
        first,
        second,
    ):
        applied = await first.apply("origin", plan_batch(batch))
        assert (len(applied.applied), applied.duplicates, applied.conflicts) == (3, [], [])
        # A new entity's key is its row's; the update kept the key of the version it replaced.
        assert await kept_keys(pg_url) == [
            (first_version.idempotency_key, first_version.digest, "origin")
        ]
        # The whole batch again (its commit's answer was lost), from a daemon that never
        # saw it: every record a duplicate, the replaced version's too.
        again = await second.apply("origin", plan_batch(batch))
        assert (again.applied, again.conflicts) == ([], [])
        assert sorted(r.idempotency_key for r in again.duplicates) == sorted(
            r.idempotency_key for r in batch
        )
        # The replaced version alone, in a batch of its own, later.
        alone = await second.apply("origin", plan_batch([first_version]))
        assert [r.idempotency_key for r in alone.duplicates] == [first_version.idempotency_key]
    rows = await fetch(
        pg_url,
        "SELECT (SELECT title FROM acode.sessions WHERE session_id = 'sess_1'), "
        "(SELECT count(*) FROM acode.sessions), (SELECT count(*) FROM acode.conflicts)",
    )
    assert tuple(rows[0]) == ("second", 2, 0)
    assert await kept_keys(pg_url) == [
        (first_version.idempotency_key, first_version.digest, "origin")
    ]


async def test_two_origins_with_one_key_are_a_conflict_and_then_both_duplicates(
    pg_url: str,
) -> None:
    # Two origins' versions of one entity in one microsecond share a key. The later origin
    # ("b" > "a") wins; the version it replaced keeps its key with its own digest.
    from_a = session_version(SESSION_VERSION, "a")
    from_b = session_version(SESSION_VERSION, "b")
    async with two_daemons(settings(pg_url)) as (first, second):
        assert len((await first.apply("a", plan_batch([from_a]))).applied) == 1
        tie = await second.apply("b", plan_batch([from_b]))
        assert [(c.incoming_origin, c.current_origin, c.winner) for c in tie.conflicts] == [
            ("b", "a", "incoming")
        ]
        assert await kept_keys(pg_url) == [(from_a.idempotency_key, from_a.digest, "a")]
        resent_a = await first.apply("a", plan_batch([from_a]))
        resent_b = await second.apply("b", plan_batch([from_b]))
        assert ([len(o.duplicates) for o in (resent_a, resent_b)]) == [1, 1]
        assert resent_a.conflicts == resent_b.conflicts == []
    (row,) = await fetch(pg_url, "SELECT count(*) FROM acode.conflicts")
    assert row[0] == 1


async def test_a_lost_conflict_sent_again_is_a_duplicate(pg_url: str) -> None:
    held = session_version(LATER, "newer")
    stale = session_version(SESSION_VERSION, "older")
    async with two_daemons(settings(pg_url)) as (first, second):
        assert len((await first.apply("a", plan_batch([held]))).applied) == 1
        lost = await second.apply("b", plan_batch([stale]))
        assert [c.winner for c in lost.conflicts] == ["current"]
        again = await second.apply("b", plan_batch([stale]))
        assert ([r.idempotency_key for r in again.duplicates], again.conflicts) == (
            [stale.idempotency_key],
            [],
        )
        assert await kept_keys(pg_url) == [(stale.idempotency_key, stale.digest, "b")]
        # The conflicts' retention (sync.conflict_retention_days) may be shorter than the
        # keys': the lost version's key still tells its resend from a new conflict.
        await fetch(pg_url, "DELETE FROM acode.conflicts")
        late = await second.apply("b", plan_batch([stale]))
        assert (len(late.duplicates), late.conflicts) == (1, [])
    (row,) = await fetch(pg_url, "SELECT count(*) FROM acode.conflicts")
    assert row[0] == 0


@pytest.mark.parametrize("replacement", ["later", "tie"])
async def test_a_losing_resend_whose_row_changes_under_the_round_is_judged_again(
    pg_url: str, replacement: str
) -> None:
    # sess_1 is at its first version. A writer that shares no session lock with the batch
    # replaces it (and keeps its key, as a round does) in a transaction still open when the
    # batch resends the first version. The round's snapshot predates that key, but its row
    # lock waits for the writer and then reads the second version: the resend would be
    # judged against a version it never saw replaced and recorded as a conflict with it.
    # The round sees its row is not its snapshot's, and the batch runs again: a duplicate.
    # In a tie the second version has the first's key (another origin, one microsecond):
    # the row's key alone would not show the change.
    first_version = session_version(SESSION_VERSION, "first")
    applier = PostgresTarget(settings(pg_url))
    writer = await asyncpg.connect(pg_url)
    try:
        assert len((await applier.apply("origin", plan_batch([first_version]))).applied) == 1
        transaction = writer.transaction()
        await transaction.start()
        await writer.execute(
            "INSERT INTO acode.applied_keys (session_id, idempotency_key, version, "
            "payload_digest, origin_id) SELECT session_id, idempotency_key, updated_at, "
            "payload_digest, origin_id FROM acode.sessions WHERE session_id = 'sess_1'"
        )
        await writer.execute(
            "UPDATE acode.sessions SET title = 'second', updated_at = $1::text::timestamptz, "
            "idempotency_key = 'Session:sess_1:' || $1, payload_digest = '\\x00'::bytea, "
            "origin_id = 'writer' WHERE session_id = 'sess_1'",
            LATER if replacement == "later" else SESSION_VERSION,
        )
        outcome = await resent_until_commit(applier, "origin", first_version, transaction)
        assert [r.idempotency_key for r in outcome.duplicates] == [first_version.idempotency_key]
        assert (outcome.applied, outcome.conflicts) == ([], [])
        assert await writer.fetchval("SELECT count(*) FROM acode.conflicts") == 0
        title = await writer.fetchval("SELECT title FROM acode.sessions")
        assert title == "second"
    finally:
        await writer.close()
        await applier.close()


async def test_the_entity_tables_keep_only_their_keys(pg_url: str) -> None:
    applier = PostgresTarget(settings(pg_url))
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


async def test_a_connection_prepares_one_round_statement(pg_url: str) -> None:
    # With a statement cache the round is one statement for every table, prepared once per
    # connection: its plans take megabytes in every backend. New entities, updates and
    # resends all go through that one.
    async with two_daemons(settings(pg_url)) as (first, second):
        assert second.settings.statement_cache_size > 0
        assert len((await first.apply("origin", plan_batch([prepared_session(1)]))).applied) == 1
        batch = [prepared_session(2), prepared_session(2, LATER)]
        assert len((await second.apply("origin", plan_batch(batch))).applied) == 2
        again = await second.apply("origin", plan_batch([prepared_session(1)]))
        assert [r.entity_id for r in again.duplicates] == ["sess_1"]
        pool = await second._get_pool()
        async with pool.acquire() as conn:
            prepared = await conn.fetchval(
                "SELECT count(*) FROM pg_prepared_statements "
                "WHERE statement LIKE 'WITH %INSERT INTO acode.applied_keys%'"
            )
        assert prepared == 1


async def test_the_same_bytes_from_another_origin_change_nothing(pg_url: str) -> None:
    # Two origins sent byte for byte the same version under one key: the later origin's
    # is a resend of what PostgreSQL holds, and writes nothing (no row rewritten, no key).
    from_a = session_version(SESSION_VERSION, "same")
    from_b = session_version(SESSION_VERSION, "same")
    async with two_daemons(settings(pg_url)) as (first, second):
        assert len((await first.apply("a", plan_batch([from_a]))).applied) == 1
        (before,) = await fetch(pg_url, "SELECT xmin::text, origin_id FROM acode.sessions")
        again = await second.apply("b", plan_batch([from_b]))
        assert (len(again.duplicates), again.applied, again.conflicts) == (1, [], [])
    (after,) = await fetch(pg_url, "SELECT xmin::text, origin_id FROM acode.sessions")
    assert tuple(after) == tuple(before) == (before[0], "a")
    assert await kept_keys(pg_url) == []


async def test_a_loser_whose_conflict_is_recorded_under_the_round_is_judged_again(
    pg_url: str,
) -> None:
    # Two batches send one losing version at once (a copied workspace, say, under another
    # session lock). The first records the conflict; the second's snapshot predates it, so
    # it would find nothing and its own record would do nothing: neither conflict nor
    # duplicate. It is judged again, and is a duplicate.
    held = session_version(LATER, "newer")
    stale = session_version(SESSION_VERSION, "older")
    applier = PostgresTarget(settings(pg_url))
    writer = await asyncpg.connect(pg_url)
    try:
        assert len((await applier.apply("a", plan_batch([held]))).applied) == 1
        transaction = writer.transaction()
        await transaction.start()
        await writer.execute("SELECT FROM acode.sessions WHERE session_id = 'sess_1' FOR UPDATE")
        await writer.execute(
            "INSERT INTO acode.conflicts (entity_type, entity_id, session_id, incoming_key, "
            "incoming_digest, incoming_origin, incoming_updated_at, incoming_version, "
            "current_key, current_origin, current_updated_at, current_version, winner) "
            "SELECT 'Session', 'sess_1', 'sess_1', $1, $2, 'b', $3::text::timestamptz, "
            "'{}', idempotency_key, origin_id, updated_at, '{}', 'current' "
            "FROM acode.sessions",
            stale.idempotency_key,
            stale.digest,
            SESSION_VERSION,
        )
        outcome = await resent_until_commit(applier, "b", stale, transaction)
        assert [r.idempotency_key for r in outcome.duplicates] == [stale.idempotency_key]
        assert (outcome.applied, outcome.conflicts) == ([], [])
        assert await writer.fetchval("SELECT count(*) FROM acode.conflicts") == 1
    finally:
        await writer.close()
        await applier.close()


async def test_a_tie_lost_and_then_replaced_keeps_both_versions_known(pg_url: str) -> None:
    # "b" holds the version; "a"'s, with the same key, loses the tie. Then a later version
    # replaces "b"'s. The key's one place in applied_keys is "b"'s (the version replaced);
    # "a"'s is known by its conflict. Both resends are duplicates.
    from_a = session_version(SESSION_VERSION, "a")
    from_b = session_version(SESSION_VERSION, "b")
    later = session_version(LATER, "later", base=SESSION_VERSION)
    async with two_daemons(settings(pg_url)) as (first, second):
        assert len((await second.apply("b", plan_batch([from_b]))).applied) == 1
        tie = await first.apply("a", plan_batch([from_a]))
        assert [c.winner for c in tie.conflicts] == ["current"]
        assert len((await second.apply("b", plan_batch([later]))).applied) == 1
        assert await kept_keys(pg_url) == [(from_b.idempotency_key, from_b.digest, "b")]
        resent_b = await second.apply("b", plan_batch([from_b]))
        resent_a = await first.apply("a", plan_batch([from_a]))
        assert [len(o.duplicates) for o in (resent_a, resent_b)] == [1, 1]
        assert resent_a.conflicts == resent_b.conflicts == []


@pytest.mark.parametrize("held", ["b", "a"])
async def test_a_third_origin_sending_a_tied_version_delivered_before_is_a_duplicate(
    pg_url: str, held: str
) -> None:
    # Three origins, one microsecond, one key; "c" sends byte for byte "a"'s version. With
    # "b"'s held, "a"'s lost and is a conflict; with "a"'s held first, "b"'s replaced it and
    # "a"'s key is kept. Either way "c"'s is "a"'s change delivered again: it writes nothing.
    from_a, from_b = session_version(SESSION_VERSION, "a"), session_version(SESSION_VERSION, "b")
    first_origin, first = ("b", from_b) if held == "b" else ("a", from_a)
    second_origin, second = ("a", from_a) if held == "b" else ("b", from_b)
    async with two_daemons(settings(pg_url)) as (one, other):
        assert len((await one.apply(first_origin, plan_batch([first]))).applied) == 1
        assert len((await other.apply(second_origin, plan_batch([second]))).conflicts) == 1
        (before,) = await fetch(pg_url, "SELECT xmin::text, title FROM acode.sessions")
        again = await one.apply("c", plan_batch([from_a]))
        assert (len(again.duplicates), again.applied, again.conflicts) == (1, [], [])
    (after,) = await fetch(pg_url, "SELECT xmin::text, title FROM acode.sessions")
    assert tuple(after) == tuple(before) == (before[0], "b")
    (row,) = await fetch(pg_url, "SELECT count(*) FROM acode.conflicts")
    assert row[0] == 1


async def test_a_winner_whose_conflict_was_recorded_before_is_applied_not_raced(
    pg_url: str,
) -> None:
    # A row set back to an older version (restored by hand from a backup) while conflicts
    # are kept: a resend of a version that lost a conflict now wins over the row, and its
    # conflict is there already. It is applied (not judged again and again).
    held = session_version(LATER, "newer")
    stale = session_version("2026-12-01T00:00:00.500000Z", "stale", base=SESSION_VERSION)
    async with two_daemons(settings(pg_url)) as (first, second):
        assert len((await first.apply("a", plan_batch([held]))).applied) == 1
        assert len((await second.apply("b", plan_batch([stale]))).conflicts) == 1
        await fetch(
            pg_url,
            "UPDATE acode.sessions SET updated_at = '2026-12-01T00:00:00.25Z', "
            "idempotency_key = 'Session:sess_1:2026-12-01T00:00:00.250000Z', title = 'restored'",
        )
        again = await second.apply("b", plan_batch([stale]))
        assert [r.idempotency_key for r in again.applied] == [stale.idempotency_key]
    (row,) = await fetch(pg_url, "SELECT title FROM acode.sessions")
    assert row[0] == "stale"
