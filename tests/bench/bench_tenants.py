"""The cost of tenants (row-level security and the guard trigger) on the drain.

    python -m tests.bench.bench_tenants [--records 100000] [--workspaces 10] [--rounds 2]

Seeds the workspaces once (the records of tests/bench/bench_sync.py: ~1 KB payloads of
every entity type, ~10% updates), then, in each round and for each mode, copies them,
creates a fresh central database migrated by its owner, a syncer role given its rights
by `acode db grant`'s code, with or without `acode db tenants enable`, and drains every
copy as that role with the real engine. Prints records/s per mode, alternating the modes
within a round so that both see the same machine, and the ratio of the medians.
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
from pathlib import Path
from typing import Final

import anyio
import anyio.to_thread
import structlog

from acode_sync.config import PostgresSettings, SyncSettings
from acode_sync.log import configure_logging
from acode_sync.postgres import PostgresTarget
from acode_sync.roles import grant_syncer, set_tenants
from acode_sync.sync import tune_interpreter
from tests.bench.bench_sync import POOL_MAX, _admin, drain_all, not_processed, seed
from tests.pg import database_url

MODES: Final = ("without tenants", "with tenants")
CONCURRENCY: Final = 10


async def drain_once(seeded: Sequence[Path], directory: Path, tenants: bool) -> float:
    """Records/s of one drain of a copy of the seeded workspaces into a fresh database."""
    name = f"acode_bench_tenants_{os.getpid()}_{secrets.token_hex(4)}"
    role = f"acode_bench_syncer_{secrets.token_hex(4)}"
    copies = [directory / w.name for w in seeded]
    for source, copy in zip(seeded, copies, strict=True):
        await anyio.to_thread.run_sync(shutil.copytree, source, copy)
    await _admin(f'CREATE DATABASE "{name}"')
    await _admin(f"CREATE ROLE {role} LOGIN")
    dsn = database_url(name)
    try:
        owner = PostgresTarget(PostgresSettings(dsn=dsn))
        try:
            await owner.ensure_schema(explicit=True)
            await grant_syncer(owner, role)
            if tenants:
                await set_tenants(owner, enabled=True)
        finally:
            await owner.close()
        syncer = PostgresTarget(
            PostgresSettings(dsn=dsn.replace("postgres@", f"{role}@", 1), pool_max=POOL_MAX)
        )
        try:
            drained = await drain_all(syncer, copies, CONCURRENCY, SyncSettings(), {})
        finally:
            await syncer.close()
        left = sum(not_processed(copy) for copy in copies)
        if left or drained.failed:
            raise AssertionError(f"{left} records not processed, {drained.failed} failed")
        return drained.shipped / drained.seconds
    finally:
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await _admin(f"DROP ROLE IF EXISTS {role}")
        for copy in copies:
            await anyio.to_thread.run_sync(shutil.rmtree, copy)


async def run(
    records: int, workspaces: int, rounds: int, directory: Path
) -> dict[str, list[float]]:
    seeded = [directory / "seeded" / f"ws-{i:04d}" for i in range(workspaces)]
    await anyio.to_thread.run_sync(seed, seeded, records, 1)
    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    for n in range(rounds):
        order = MODES if n % 2 == 0 else MODES[::-1]
        for mode in order:
            rate = await drain_once(seeded, directory / "drain", mode == "with tenants")
            rates[mode].append(rate)
            print(f"round {n + 1}, {mode}: {rate:,.0f} records/s", flush=True)
    return rates


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--workspaces", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args(argv)
    tune_interpreter()
    print(
        f"acode-sync tenants benchmark: {args.records:,} records, {args.workspaces} "
        f"workspaces, concurrency {CONCURRENCY}, {args.rounds} rounds, {os.cpu_count()} CPUs"
    )
    directory = Path(tempfile.mkdtemp(prefix="acode-bench-tenants-", dir=args.dir))
    saved_logging = structlog.get_config()
    try:
        configure_logging(level="warning", stream=sys.stderr)
        rates = anyio.run(
            run, args.records, args.workspaces, args.rounds, directory, backend="asyncio"
        )
    finally:
        structlog.configure(**saved_logging)
        shutil.rmtree(directory)
    without, with_ = (statistics.median(rates[mode]) for mode in MODES)
    print(f"drain without tenants: {without:,.0f} records/s (median)")
    print(f"drain with tenants:    {with_:,.0f} records/s (median)")
    print(f"with / without:        {with_ / without:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
