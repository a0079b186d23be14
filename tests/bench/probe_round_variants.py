"""What the round statement's variants would cost a backend with the statement cache on:
one statement per set of entity types (63), each prepared with its generic plan. It is
why a connection with the cache on sends every round as the one statement for every
table, and only a connection without it (behind a pooler, where nothing stays prepared)
sends the variant naming its records' tables (postgres.PostgresTarget._round).

    python -m tests.bench.probe_round_variants

Prints the backend's memory (pg_backend_memory_contexts) after preparing and running
once the statement for every table, and then every variant, on a fresh connection each.
"""

from __future__ import annotations

import itertools

import anyio
import asyncpg

from acode_sync.pg_tables import ENTITY_TYPES, round_sql
from acode_sync.postgres import STATEMENT_CACHE_LIMIT
from tests.bench.bench_pooled import migrated_database

EMPTY: tuple[str, bytes, list[int], list[int], bytes] = ("[]", b"", [], [], b"")
MEMORY = "SELECT sum(total_bytes) FROM pg_backend_memory_contexts"


async def grown_by(dsn: str, variants: list[tuple[str, ...]]) -> int:
    conn = await asyncpg.connect(
        dsn, statement_cache_size=100, max_cacheable_statement_size=STATEMENT_CACHE_LIMIT
    )
    try:
        await conn.execute("SET plan_cache_mode = force_generic_plan; SET enable_seqscan = off")
        before = int(await conn.fetchval(MEMORY))
        for types in variants:
            arguments = [a for _ in types for a in EMPTY]
            await conn.fetch(round_sql(types, history=False), "o", *arguments)
        return int(await conn.fetchval(MEMORY)) - before
    finally:
        await conn.close()


async def run() -> None:
    async with migrated_database() as dsn:
        every = [
            types
            for n in range(1, len(ENTITY_TYPES) + 1)
            for types in itertools.combinations(ENTITY_TYPES, n)
        ]
        one = await grown_by(dsn, [ENTITY_TYPES])
        all_variants = await grown_by(dsn, every)
        print(f"the statement for every table: backend memory +{one / 2**20:.1f} MiB")
        print(
            f"all {len(every)} variants: +{all_variants / 2**20:.1f} MiB "
            f"({all_variants / max(1, one):.1f}x)"
        )


if __name__ == "__main__":
    anyio.run(run)
