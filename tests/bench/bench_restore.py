"""`acode db restore` of a large central database.

    python -m tests.bench.bench_restore [--sessions 100000] [--events 9]

Seeds a fresh PostgreSQL database with `--sessions` sessions of `--events` events each
(1,000,000 entities by default), then:

1. baseline: a plain COPY out of the same rows (the restore's own SELECT, to a sink):
   what reading them costs at all.
2. `acode db restore --all` as a real process into a new workspace, at a tenth of the
   rows and at all of them: entities/s and the process's peak RSS. A restore that streams
   has about the same peak at both sizes.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import anyio
import asyncpg

from acode_sync.restore import STATEMENTS
from tests.central import seed_central
from tests.daemon_harness import ACODE, child_env
from tests.pg import create_database, database_url, drop_database

TARGET_ENTITIES_PER_SECOND: Final = 20_000


async def copy_out(dsn: str) -> float:
    """Seconds to COPY every restored column of sessions and events to a sink."""
    conn = await asyncpg.connect(dsn)
    try:
        started = time.perf_counter()
        for entity_type in ("Session", "SessionEvent"):
            query = STATEMENTS[entity_type].select["all"].rstrip(";")
            await conn.copy_from_query(query, output=_sink)
        return time.perf_counter() - started
    finally:
        await conn.close()


async def _sink(_chunk: bytes) -> None:
    return None


def run_restore(dsn: str, workspace: Path) -> tuple[float, int, str]:
    """Seconds, peak RSS (KiB) of the restore process, and its output."""
    workspace.mkdir()
    env = child_env(ACODE_POSTGRES_URL=dsn, XDG_CONFIG_HOME=str(workspace / "none"))
    started = time.perf_counter()
    done = subprocess.run(
        [ACODE, "db", "restore", "--workspace", str(workspace), "--all"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    return seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, done.stdout


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.bench_restore",
        description="Time acode db restore of a large central database.",
    )
    parser.add_argument("--sessions", type=int, default=100_000, help="sessions to seed")
    parser.add_argument("--events", type=int, default=9, help="events per session")
    parser.add_argument("--dir", type=Path, default=None, help="where the workspaces go")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    names = [create_database(), create_database()]
    try:
        small, large = (database_url(name) for name in names)
        small_count = anyio.run(seed_central, small, max(args.sessions // 10, 1), args.events)
        count = anyio.run(seed_central, large, args.sessions, args.events)
        print(f"acode-sync restore benchmark: {count} entities ({args.sessions} sessions)")
        copy_seconds = anyio.run(copy_out, large)
        print(f"baseline: COPY out of the same rows  {count / copy_seconds:>10,.0f} entities/s")
        with tempfile.TemporaryDirectory(dir=args.dir) as root:
            for label, dsn, entities in (("tenth", small, small_count), ("all", large, count)):
                seconds, peak_kib, out = run_restore(dsn, Path(root) / label)
                (total,) = (line for line in out.splitlines() if line.startswith("total: "))
                rate = entities / seconds
                print(
                    f"restore --all, {entities:>9} entities  {rate:>10,.0f} entities/s  "
                    f"peak RSS {peak_kib / 1024:>6.0f} MiB  "
                    f"{rate / (count / copy_seconds):5.2f}x COPY's rate  ({total})"
                )
        met = "met" if rate >= TARGET_ENTITIES_PER_SECOND else "MISSED"
        print(f"target >= {TARGET_ENTITIES_PER_SECOND} entities/s: {met}")
    finally:
        for name in names:
            drop_database(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
