"""The drain into a central store that already holds many rows: today's layout against
the previous one (migration 0005: unpartitioned applied_keys and conflicts, keys on the
entity id alone), in the same run.

    python -m tests.bench.bench_growth [--preload 10000000] [--records 100000]

Creates two PostgreSQL databases, one migrated to 0005 by the engine of --baseline (a
commit, by default the one this branch started from, run from `git archive` in a child
process) and one to this program's version (--engine, HEAD by default, extracted the
same way). Preloads --preload rows into each with
INSERT ... SELECT generate_series, not through the engine: entity rows (half session
events, half tool calls, 50 per session, plus their sessions) and one applied key per
entity row, their versions spread over the last 14 days (the key retention). Then seeds
the same --records outbox records (tests/bench/bench_sync.py's mix, ~1 KB each) once
with the previous engine (this one migrates the workspaces before its drain is timed),
copies the workspaces, and drains one copy into each database with that database's
engine, in a child process each. Prints records/s and PostgreSQL backend CPU per record
for both, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.to_thread
import asyncpg

from tests.pg import ADMIN_URL, database_url

REPO: Final = Path(__file__).resolve().parents[2]
PRELOAD_CHUNK: Final = 1_000_000
SESSION_SIZE: Final = 50  # preloaded entity rows per session
SPREAD: Final = timedelta(days=14)
OLD_VERSION: Final = 5
CONCURRENCY: Final = 4
POOL_MAX: Final = 10

_CANONICAL = "to_char(v AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"
_ROWS = """
    SELECT i, '{prefix}_pre' || lpad(i::text, 10, '0') AS id,
           'sess_pre' || lpad((i / {session_size})::text, 8, '0') AS session_id,
           $2::timestamptz + (i - 1) * $3::interval AS v
    FROM generate_series($1::bigint, $1::bigint + $4::bigint - 1) AS i
"""
_ENTITY_SQL: Final = {
    "session_events": (
        "evt",
        "SessionEvent",
        "INSERT INTO acode.session_events (event_id, session_id, event_type, payload, "
        "created_at, updated_at, origin_id, idempotency_key, payload_digest) "
        "SELECT id, session_id, 'note', '{{\"n\": 1}}', v, v, 'preload', {key}, "
        "sha256(id::bytea) FROM ({rows}) AS r",
    ),
    "tool_calls": (
        "tc",
        "ToolCall",
        "INSERT INTO acode.tool_calls (tool_call_id, step_id, session_id, name, arguments, "
        "result, status, created_at, updated_at, origin_id, idempotency_key, payload_digest) "
        "SELECT id, 'step_pre' || lpad((i / 5)::text, 10, '0'), session_id, 'bash', "
        "'{{\"cmd\": \"ls\"}}', '{{\"ok\": true}}', 'done', v, v, 'preload', {key}, "
        "sha256(id::bytea) FROM ({rows}) AS r",
    ),
}
_KEY_SQL: Final = {
    # The layout of migration 0005, then this program's.
    "old": "INSERT INTO acode.applied_keys (idempotency_key, payload_digest, origin_id, "
    "applied_at) SELECT {key}, sha256(id::bytea), 'preload', v FROM ({rows}) AS r",
    "new": "INSERT INTO acode.applied_keys (session_id, idempotency_key, version, "
    "payload_digest, origin_id, applied_at) "
    "SELECT session_id, {key}, v, sha256(id::bytea), 'preload', v FROM ({rows}) AS r",
}
_SESSIONS_SQL: Final = (
    "INSERT INTO acode.sessions (session_id, state, title, created_at, updated_at, "
    "origin_id, idempotency_key, payload_digest) "
    "SELECT DISTINCT ON (session_id) session_id, 'EXECUTING', 'preloaded', v, v, 'preload', "
    "'Session:' || session_id || ':' || {canonical}, sha256(session_id::bytea) "
    "FROM ({rows}) AS r ORDER BY session_id, v ON CONFLICT DO NOTHING"
)


def _sql(template: str, prefix: str, entity_type: str) -> str:
    rows = _ROWS.format(prefix=prefix, session_size=SESSION_SIZE)
    key = f"'{entity_type}:' || id || ':' || {_CANONICAL}"
    return template.format(key=key, rows=rows, canonical=_CANONICAL)


async def preload(dsn: str, layout: str, rows: int, say: Any) -> None:
    """`rows` entity rows (half events, half tool calls) with their sessions and keys."""
    start = datetime.now(UTC) - SPREAD
    conn = await asyncpg.connect(dsn)
    try:
        if layout == "new":  # the partitions the daemon's hourly maintenance keeps
            from acode_sync.partitions import ensure
            from acode_sync.retention import APPLIED_KEYS

            await ensure(conn, APPLIED_KEYS.spec(SPREAD))
        for table, (prefix, entity_type, template) in _ENTITY_SQL.items():
            count = rows // 2
            step = SPREAD / max(1, count)
            for first in range(1, count + 1, PRELOAD_CHUNK):
                size = min(PRELOAD_CHUNK, count - first + 1)
                arguments = (first, start, step, size)
                started = time.perf_counter()
                await conn.execute(_sql(template, prefix, entity_type), *arguments)
                await conn.execute(_sql(_KEY_SQL[layout], prefix, entity_type), *arguments)
                await conn.execute(_sql(_SESSIONS_SQL, prefix, entity_type), *arguments)
                say(
                    f"  {layout}: {table} {first + size - 1:,}/{count:,} "
                    f"({time.perf_counter() - started:.1f} s)"
                )
        await conn.execute("VACUUM ANALYZE")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


def child(source: Path, *argv: str) -> dict[str, Any]:
    """Run this module's --child mode with the engine at `source` (a src directory)."""
    env = {"PYTHONPATH": f"{source}:{REPO}", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "tests.bench.bench_growth", "--child", *argv],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"child {argv[0]} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def migrated_workspaces(directory: Path) -> list[Path]:
    """The workspaces under `directory`, migrated to this engine's schema (before the
    drain is timed)."""
    from acode_sync.store import WorkspaceDatabase

    workspaces = sorted(directory.iterdir())
    for workspace in workspaces:
        WorkspaceDatabase(workspace).close()
    return workspaces


async def child_main(mode: str, dsn: str, version: int, directory: str) -> dict[str, Any]:
    from acode_sync.config import PostgresSettings, SyncSettings
    from acode_sync.migrations import load_migrations
    from acode_sync.postgres import PostgresTarget
    from tests.bench.baselines import BackendCpu
    from tests.bench.bench_sync import drain_all

    if mode == "seed":  # the previous engine's workspaces, which this program migrates
        from tests.bench.bench_sync import seed

        workspaces = [Path(directory) / f"ws-{i:03d}" for i in range(int(dsn))]
        seeded = seed(workspaces, version, 1)
        return {"records": seeded.records, "entities": seeded.entities}
    target = PostgresTarget(PostgresSettings(dsn=dsn, pool_max=POOL_MAX))
    try:
        await target.ensure_schema(load_migrations("postgres")[:version], explicit=True)
        if mode == "migrate":
            return {}
        workspaces = await anyio.to_thread.run_sync(migrated_workspaces, Path(directory))
        backends = await BackendCpu.of(dsn)
        with backends:
            drained = await drain_all(target, workspaces, CONCURRENCY, SyncSettings(), {})
        return {
            "records": drained.shipped,
            "seconds": drained.seconds,
            "server_cpu": backends.seconds,
            "failed": drained.failed,
        }
    finally:
        await target.close()


def engine_source(commit: str, directory: Path) -> Path:
    """The engine of `commit`, extracted with git archive (its src/ only): what is timed
    does not change while the benchmark runs."""
    directory.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", commit, "src"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive.stdout, check=True)
    return directory / "src"


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN_URL)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def time_migration(name: str, sources: dict[str, Path], rows: int, say: Any) -> int:
    """The previous layout, preloaded, migrated in place to this program's version."""
    anyio.run(_admin, f'CREATE DATABASE "{name}"')
    child(sources["old"], "migrate", database_url(name), str(OLD_VERSION), "-")
    anyio.run(preload, database_url(name), "old", rows, say)
    started = time.perf_counter()
    child(sources["new"], "migrate", database_url(name), "10000", "-")
    say(
        f"in-place migration of {rows:,} entity rows and {rows:,} keys from version "
        f"{OLD_VERSION}: {time.perf_counter() - started:.0f} s"
    )
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preload", type=int, default=10_000_000)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--workspaces", type=int, default=10)
    parser.add_argument("--baseline", default="24c1a8a", help="commit of the previous layout")
    parser.add_argument("--engine", default="HEAD", help="commit of this layout's engine")
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument(
        "--new-first", action="store_true", help="drain this layout first (order effects)"
    )
    parser.add_argument(
        "--migration-only",
        action="store_true",
        help="time only the in-place migration of the previous layout holding --preload rows",
    )
    parser.add_argument("--child", nargs=4, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        mode, dsn, version, directory = args.child
        print(json.dumps(anyio.run(child_main, mode, dsn, int(version), directory)))
        return 0

    def say(text: str) -> None:
        print(text, flush=True)

    root = Path(tempfile.mkdtemp(prefix="bench-growth-", dir=args.dir))
    names = {
        "old": f"bench_growth_old_{int(time.time())}",
        "new": f"bench_growth_new_{int(time.time())}",
    }
    sources = {
        "old": engine_source(args.baseline, root / "engine-old"),
        "new": engine_source(args.engine, root / "engine-new"),
    }
    versions = {"old": OLD_VERSION, "new": 0}
    try:
        say(
            f"acode-sync growth benchmark: {args.preload:,} rows preloaded centrally, then "
            f"{args.records:,} records from {args.workspaces} workspaces drained; "
            f"previous layout: migration {OLD_VERSION} run by {args.baseline}, this one by "
            f"{args.engine}"
        )
        if args.migration_only:
            return time_migration(names["old"], sources, args.preload, say)
        results = {}
        for layout, name in names.items():
            anyio.run(_admin, f'CREATE DATABASE "{name}"')
            version = versions[layout] or 10_000  # all of this program's migrations
            child(sources[layout], "migrate", database_url(name), str(version), "-")
            started = time.perf_counter()
            anyio.run(preload, database_url(name), layout, args.preload, say)
            say(f"{layout}: preloaded in {time.perf_counter() - started:.0f} s")
        dirs = {layout: root / layout for layout in names}
        dirs["old"].mkdir()
        seeded = child(
            sources["old"], "seed", str(args.workspaces), str(args.records), str(dirs["old"])
        )
        shutil.copytree(dirs["old"], dirs["new"])
        say(f"seeded {seeded['records']:,} records ({seeded['entities']:,} entities)")
        order = ["new", "old"] if args.new_first else ["old", "new"]
        for layout in order:
            name = names[layout]
            version = versions[layout] or 10_000
            results[layout] = child(
                sources[layout], "drain", database_url(name), str(version), str(dirs[layout])
            )
            r = results[layout]
            say(
                f"{layout:>3}: {r['records']:,} records in {r['seconds']:.1f} s = "
                f"{r['records'] / r['seconds']:,.0f} records/s, PostgreSQL CPU "
                f"{1e6 * r['server_cpu'] / r['records']:.1f} us/record, failed {r['failed']}"
            )
        old, new = results["old"], results["new"]
        rate = (new["records"] / new["seconds"]) / (old["records"] / old["seconds"])
        cpu = (new["server_cpu"] / new["records"]) / (old["server_cpu"] / old["records"])
        say(f"new/old: records/s x{rate:.2f}, PostgreSQL CPU per record x{cpu:.2f}")
        return 0 if old["failed"] == new["failed"] == 0 else 1
    finally:
        for name in names.values():
            anyio.run(_admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
