"""The cost of the version history ([postgres] keep_history) on the drain.

    python -m tests.bench.bench_history [--records 200000] [--workspaces 1] [--rounds 1]

Seeds the records once (bench_sync's generator: ~1 KB payloads, ~10% updates), then, per
round, drains an identical copy of the seeded workspaces into a fresh PostgreSQL
database with the history off, and another copy into another fresh database with it on
(its partitions made first, as a daemon does at start); the order alternates from round
to round. Prints, for both, records/s over the drain's wall time and the CPU per record
of the database's backends and of this process, the history's size on disk per record,
and the ratios on / off. Checks that the history holds one row per record applied with
it on, and none with it off.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio
import asyncpg
import structlog

from acode_sync.config import PostgresSettings, SyncSettings
from acode_sync.history import maintain_history
from acode_sync.log import configure_logging
from acode_sync.sync import tune_interpreter
from tests.bench.baselines import BackendCpu, own_cpu
from tests.bench.bench_sync import DAEMON_CONCURRENCY, POOL_MAX, TimedTarget, drain_all, seed
from tests.pg import ADMIN_URL, database_url

MODES = ("off", "on")


@dataclass(frozen=True, slots=True)
class Run:
    mode: str
    records: int
    seconds: float
    backend_cpu: float
    own_cpu: float
    history_rows: int
    history_bytes: int

    @property
    def rate(self) -> float:
        return self.records / self.seconds

    def per_record_us(self, seconds: float) -> float:
        return seconds / self.records * 1e6


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN_URL)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _history_facts(dsn: str) -> tuple[int, int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = int(await conn.fetchval("SELECT count(*) FROM acode.entity_history"))
        size = int(
            await conn.fetchval(
                "SELECT coalesce(sum(pg_total_relation_size(inhrelid)), 0) FROM pg_inherits "
                "WHERE inhparent = 'acode.entity_history'::regclass"
            )
        )
    finally:
        await conn.close()
    return rows, size


async def drain_once(
    mode: str, seeded: Path, directory: Path, workspaces: int, args: argparse.Namespace
) -> Run:
    copies = [directory / f"ws-{i:04d}" for i in range(workspaces)]
    for i, copy in enumerate(copies):
        await anyio.to_thread.run_sync(shutil.copytree, seeded / f"ws-{i:04d}", copy)
    name = f"acode_bench_history_{os.getpid()}_{secrets.token_hex(4)}"
    dsn = database_url(name)
    await _admin(f'CREATE DATABASE "{name}"')
    try:
        settings = PostgresSettings(dsn=dsn, pool_max=POOL_MAX, keep_history=mode == "on")
        target = TimedTarget(settings)
        try:
            await target.ensure_schema()
            if mode == "on":
                await maintain_history(target)
            backends = await BackendCpu.of(dsn)
            cpu_before = own_cpu()
            with backends:
                drained = await drain_all(
                    target, copies, args.concurrency, SyncSettings(batch_max_records=args.batch), {}
                )
            cpu_used = own_cpu() - cpu_before
        finally:
            await target.close()
        rows, size = await _history_facts(dsn)
    finally:
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await anyio.to_thread.run_sync(shutil.rmtree, directory)
    expected = drained.shipped - drained.conflicts if mode == "on" else 0
    if drained.failed or rows != expected:
        raise SystemExit(
            f"history {mode}: {rows} history rows, expected {expected}; {drained.failed} failed"
        )
    return Run(mode, drained.shipped, drained.seconds, backends.seconds, cpu_used, rows, size)


def describe(run: Run) -> str:
    history = (
        f"; history {run.history_rows:,} rows, {run.history_bytes / run.history_rows:,.0f} "
        "bytes/record on disk"
        if run.history_rows
        else "; history empty"
    )
    return (
        f"history {run.mode:>3}: {run.records:,} records in {run.seconds:.2f} s = "
        f"{run.rate:,.0f} records/s; PostgreSQL CPU {run.per_record_us(run.backend_cpu):.1f} "
        f"us/record, syncer CPU {run.per_record_us(run.own_cpu):.1f} us/record{history}"
    )


async def run(args: argparse.Namespace, directory: Path) -> list[Run]:
    seeded = directory / "seeded"
    seeded.mkdir()
    result = await anyio.to_thread.run_sync(
        seed, [seeded / f"ws-{i:04d}" for i in range(args.workspaces)], args.records, 1
    )
    print(f"seeded {result.records:,} records ({result.entities:,} entities)", flush=True)
    runs: list[Run] = []
    for round_number in range(args.rounds):
        order = MODES if round_number % 2 == 0 else MODES[::-1]
        for mode in order:
            done = await drain_once(
                mode, seeded, directory / f"run-{round_number}-{mode}", args.workspaces, args
            )
            print(f"round {round_number + 1}: {describe(done)}", flush=True)
            runs.append(done)
    return runs


def summary(runs: Sequence[Run]) -> list[str]:
    def median(mode: str, figure: str) -> float:
        values = []
        for r in runs:
            if r.mode == mode:
                values.append(
                    {
                        "rate": r.rate,
                        "pg": r.per_record_us(r.backend_cpu),
                        "own": r.per_record_us(r.own_cpu),
                    }[figure]
                )
        return statistics.median(values)

    lines = [f"{'figure (median of the rounds)':<34} {'off':>10} {'on':>10} {'on / off':>9}"]
    for label, figure in (
        ("records/s", "rate"),
        ("PostgreSQL CPU us/record", "pg"),
        ("syncer CPU us/record", "own"),
    ):
        off, on = median("off", figure), median("on", figure)
        lines.append(f"{label:<34} {off:>10,.1f} {on:>10,.1f} {on / off:>8.2f}x")
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.bench_history",
        description="The drain with the version history off and on, on the same records.",
    )
    parser.add_argument("--records", type=int, default=200_000, help="records to seed")
    parser.add_argument("--workspaces", type=int, default=1, help="workspaces to spread them")
    parser.add_argument("--batch", type=int, default=1000, help="sync.batch_max_records")
    parser.add_argument("--rounds", type=int, default=1, help="off/on pairs (order alternates)")
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to create the workspaces (default: temp)"
    )
    args = parser.parse_args(argv)
    if args.workspaces < 1 or args.records < args.workspaces or args.batch < 1 or args.rounds < 1:
        parser.error("need --workspaces >= 1, --records >= --workspaces, --batch, --rounds >= 1")
    args.concurrency = min(args.workspaces, DAEMON_CONCURRENCY)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    tune_interpreter()  # as the daemon does
    print(
        f"acode-sync history benchmark: {args.records:,} records, {args.workspaces} "
        f"workspaces, concurrency {args.concurrency}, batch {args.batch}, {args.rounds} "
        f"round(s), {os.cpu_count()} CPUs",
        flush=True,
    )
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix="acode-bench-history-", dir=args.dir))
    saved_logging = structlog.get_config()
    try:
        configure_logging(level="warning", stream=sys.stderr)
        runs = anyio.run(run, args, directory, backend="asyncio")
    finally:
        structlog.configure(**saved_logging)
        shutil.rmtree(directory)
    print()
    print("\n".join(summary(runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
