"""What a small batch costs PostgreSQL when nothing stays prepared (behind a
transaction-pooling PgBouncer), against a direct connection's statement cache.

    python -m tests.bench.bench_pooled [--batches 500] [--records 7] [--rounds 2]

First the round statement itself: PREPARE (parse and analysis) and EXPLAIN EXECUTE (the
plan) of the statement for every entity table, as every round was sent before rounds
named only their records' tables, and of the statement for SessionEvent alone (a
fleet's batches); the median of 7 each. Then batches of `--records` new SessionEvents
(a fleet's shape: an agent saves a few at a time), applied by the engine on one
connection into a fresh database, with the statement cache on (direct) and off
(`statement_cache_size = 0`, as behind PgBouncer), alternating for `--rounds` rounds.
Prints the backend's CPU per batch (its /proc counters) and the wall time per batch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import asyncpg

from acode_sync.config import PostgresSettings
from acode_sync.pg_tables import ENTITY_TYPES, round_sql
from acode_sync.postgres import BatchPlan, PostgresTarget, PreparedRecord, plan_batch
from tests.pg import create_database_async, database_url, drop_database_async

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")  # /proc's unit
WARMUP_BATCHES = 20
PLAN_SAMPLES = 7


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:5.2f} ms"


def ratio(value: float, baseline: float) -> str:
    """A tiny run may spend less than one /proc tick on the baseline."""
    return f"{value / baseline:.2f}x" if baseline > 0 else "n/a (under one clock tick)"


def backend_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def batches_of_events(count: int, size: int, first: int) -> list[BatchPlan]:
    plans = []
    n = first
    for _ in range(count):
        records = []
        for _ in range(size):
            n += 1
            version = f"2026-12-02T{n // 3_600_000_000 % 24:02d}:{n // 60_000_000 % 60:02d}:" + (
                f"{n // 1_000_000 % 60:02d}.{n % 1_000_000:06d}Z"
            )
            payload = json.dumps(
                {
                    "event_id": f"ev_{n}",
                    "session_id": "sess_fleet",
                    "event_type": "tool_output",
                    "payload": {"n": n},
                    "created_at": version,
                    "updated_at": version,
                }
            ).encode()
            records.append(
                PreparedRecord(
                    n,
                    f"SessionEvent:ev_{n}:{version}",
                    "SessionEvent",
                    f"ev_{n}",
                    "sess_fleet",
                    payload,
                    version,
                    None,
                    hashlib.sha256(payload).digest(),
                )
            )
        plans.append(plan_batch(records))
    return plans


async def plan_cost(dsn: str, entity_types: tuple[str, ...]) -> tuple[float, float]:
    """Median seconds to parse and to plan the round statement for these tables."""
    sql = round_sql(entity_types, history=False)
    arguments = ", ".join(["'o'"] + ["'[]', ''::bytea, '{}', '{}', ''::bytea"] * len(entity_types))
    conn = await asyncpg.connect(dsn, statement_cache_size=0)
    parse, plan = [], []
    try:
        for _ in range(PLAN_SAMPLES):
            async with conn.transaction():
                await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
                started = time.perf_counter()
                await conn.execute("PREPARE round AS " + sql)
                parsed = time.perf_counter()
                await conn.execute(f"EXPLAIN EXECUTE round({arguments})")
                parse.append(parsed - started)
                plan.append(time.perf_counter() - parsed)
                await conn.execute("DEALLOCATE round")
    finally:
        await conn.close()
    return statistics.median(parse), statistics.median(plan)


async def apply_batches(dsn: str, cache: int, plans: Sequence[BatchPlan]) -> tuple[float, float]:
    """Backend CPU seconds and wall seconds per batch, after a warm-up."""
    target = PostgresTarget(PostgresSettings(dsn=dsn, pool_max=1, statement_cache_size=cache))
    try:
        for plan in plans[:WARMUP_BATCHES]:
            await target.apply("bench-origin", plan)
        pool = await target._get_pool()
        pid = int(await pool.fetchval("SELECT pg_backend_pid()"))
        cpu, started = backend_seconds(pid), time.perf_counter()
        for plan in plans[WARMUP_BATCHES:]:
            await target.apply("bench-origin", plan)
        measured = len(plans) - WARMUP_BATCHES
        return (backend_seconds(pid) - cpu) / measured, (time.perf_counter() - started) / measured
    finally:
        await target.close()


@asynccontextmanager
async def migrated_database() -> AsyncIterator[str]:
    """A fresh database at this program's schema, dropped afterwards; its DSN."""
    name = await create_database_async()
    dsn = database_url(name)
    try:
        target = PostgresTarget(PostgresSettings(dsn=dsn))
        try:
            await target.ensure_schema()
        finally:
            await target.close()
        yield dsn
    finally:
        await drop_database_async(name)


async def run(args: argparse.Namespace) -> None:
    async with migrated_database() as dsn:
        print("round statement, parsed and planned (PREPARE, EXPLAIN EXECUTE; median of 7):")
        every = await plan_cost(dsn, ENTITY_TYPES)
        alone = await plan_cost(dsn, ("SessionEvent",))
        print(f"  every table (each round before):  parse {ms(every[0])}, plan {ms(every[1])}")
        print(
            f"  SessionEvent alone:                parse {ms(alone[0])}, plan {ms(alone[1])}"
            f"   {sum(alone) / sum(every):.2f}x"
        )
        print(
            f"batches of {args.records} new SessionEvents, {args.batches} each way per round, "
            f"{args.rounds} rounds, one connection; PostgreSQL backend CPU and wall time per batch:"
        )
        results: dict[str, list[tuple[float, float]]] = {"cached": [], "uncached": []}
        first = 0
        for number in range(args.rounds):
            order = ("cached", "uncached") if number % 2 == 0 else ("uncached", "cached")
            for mode in order:
                plans = batches_of_events(args.batches + WARMUP_BATCHES, args.records, first)
                first += (args.batches + WARMUP_BATCHES) * args.records
                results[mode].append(
                    await apply_batches(dsn, 100 if mode == "cached" else 0, plans)
                )
        cached = [statistics.mean(v) for v in zip(*results["cached"], strict=True)]
        uncached = [statistics.mean(v) for v in zip(*results["uncached"], strict=True)]
        print(f"  direct, statement cache on:       CPU {ms(cached[0])}   wall {ms(cached[1])}")
        print(
            f"  no statement cache (a pooler):    CPU {ms(uncached[0])}   wall {ms(uncached[1])}"
            f"   {ratio(uncached[0], cached[0])} the CPU"
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--batches", type=int, default=500)
    parser.add_argument("--records", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    if args.batches < 1 or args.records < 1 or args.rounds < 1:
        parser.error("--batches, --records and --rounds must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    anyio.run(run, parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
