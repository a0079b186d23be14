"""The daemon at work and at rest.

    python -m tests.bench.bench_daemon [--rate 1000] [--seconds 20] [--idle-workspaces 1000]

1. Latency: acode-syncd runs as a real process over 10 workspaces while two writer
   processes offer `--rate` records/s between them (a Session save each, entity + outbox
   in one durable transaction). Each record's commit time is compared with the moment
   PostgreSQL inserted its idempotency key (a test-only trigger stamps clock_timestamp(),
   just before the batch commits). Prints p50/p99/max of commit -> visible.
2. Idle: acode-syncd watches `--idle-workspaces` workspaces with nothing to do. Prints
   the CPU it uses over `--idle-seconds` (as % of one core), its RSS and open files.
3. Backlog (with `--backlog-records N`): N records seeded as bench_sync seeds them into
   `--backlog-workspaces` workspaces; acode-syncd from its start until PostgreSQL holds
   every record, then, on the same records in the same run, pgloader loading them from
   one SQLite file and a binary COPY of them (tests/bench/baselines.py). Prints each as
   records/s, as a ratio to pgloader and to COPY, and its CPU per record on both sides.

`--only latency|idle|backlog` (repeatable) runs only those parts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import anyio
import asyncpg

from acode_sync.pg_tables import TABLES
from acode_sync.store import WorkspaceDatabase
from acode_sync.workspace import database_path
from tests.bench.baselines import BackendCpu, Measured, build_source, comparison, run_baselines
from tests.bench.bench_sync import seed
from tests.pg import COUNT_APPLIED_VERSIONS, create_database, database_url, drop_database

LATENCY_P50_TARGET_MS: Final = 50.0
LATENCY_P99_TARGET_MS: Final = 250.0
IDLE_CPU_TARGET: Final = 2.0
IDLE_RSS_TARGET_MB: Final = 200.0
CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")
BACKLOG_POLL_SECONDS: Final = 0.1
BACKLOG_TIMEOUT_SECONDS: Final = 3600.0
PARTS: Final = ("latency", "idle", "backlog")

WRITER = """
import json, sys, time
from pathlib import Path
from acode_sync.domain import Session
from acode_sync.store import WorkspaceDatabase
workspaces, rate, seconds, out = json.loads(sys.argv[1])
dbs = [WorkspaceDatabase(Path(w)) for w in workspaces]
sessions = [db.save(Session()) for db in dbs]
log, start, n = [], time.monotonic(), 0
while time.monotonic() - start < seconds:
    due = start + n / rate
    pause = due - time.monotonic()
    if pause > 0:
        time.sleep(pause)
    i = n % len(dbs)
    saved = dbs[i].save(Session(session_id=sessions[i].session_id, title=str(n)))
    log.append((f"Session:{saved.session_id}:{saved.updated_at}", time.time()))
    n += 1
Path(out).write_text(json.dumps(log))
"""


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(fraction * len(ordered)) - 1)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_daemon(root: Path, url: str, workdir: Path) -> subprocess.Popen[bytes]:
    config = workdir / "acode-syncd.toml"
    config.write_text(
        f'[postgres]\ndsn = "{url}"\n'
        f'[daemon]\nroots = ["{root}"]\nmax_depth = 1\nlog_level = "warning"\n'
        f'state_dir = "{workdir / "state"}"\n'
        f"[metrics]\nport = {free_port()}\n"
    )
    notify = workdir / f"notify-{time.monotonic_ns()}.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    env = {**os.environ, "NOTIFY_SOCKET": str(notify)}
    with (workdir / "daemon.log").open("ab") as log:  # the child keeps its own descriptor
        daemon = subprocess.Popen(
            [Path(sys.executable).parent / "acode-syncd", "run", "--config", str(config)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    listener.settimeout(120)
    try:
        while b"READY=1" not in listener.recv(4096):
            pass
    finally:
        listener.close()
    return daemon


def stop(daemon: subprocess.Popen[bytes]) -> None:
    daemon.send_signal(signal.SIGTERM)
    daemon.wait(timeout=60)


async def _pg(url: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


async def _pg_script(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def latency(rate: int, seconds: float, workdir: Path) -> None:
    name = create_database()
    url = database_url(name)
    root = workdir / "latency"
    workspaces = []
    for n in range(10):
        workspace = root / f"ws{n}"
        workspace.mkdir(parents=True)
        WorkspaceDatabase(workspace).close()
        workspaces.append(str(workspace))
    try:
        migrate_postgres(url)
        anyio.run(
            _pg_script,
            url,
            "CREATE TABLE acode.bench_seen (k text, at timestamptz);"
            "CREATE FUNCTION acode.bench_seen() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "INSERT INTO acode.bench_seen VALUES (NEW.idempotency_key, clock_timestamp()); "
            "RETURN NULL; END $$;"
            "CREATE TRIGGER bench_seen AFTER INSERT OR UPDATE ON acode.sessions "
            "FOR EACH ROW EXECUTE FUNCTION acode.bench_seen();",
        )
        daemon = start_daemon(root, url, workdir)
        try:
            writers: list[tuple[subprocess.Popen[bytes], Path]] = []
            for half in (workspaces[:5], workspaces[5:]):
                out = workdir / f"writer-{len(writers)}.json"
                spec = json.dumps([half, rate / 2, seconds, str(out)])
                writers.append((subprocess.Popen([sys.executable, "-c", WRITER, spec]), out))
            committed: dict[str, float] = {}
            for process, out in writers:
                process.wait(timeout=seconds + 120)
                committed.update(json.loads(out.read_text()))
            deadline = time.monotonic() + 60
            seen: dict[str, float] = {}
            while time.monotonic() < deadline:
                rows = anyio.run(_pg, url, "SELECT k, at FROM acode.bench_seen")
                seen = {r["k"]: r["at"].timestamp() for r in rows}
                if set(committed) <= set(seen):
                    break
                time.sleep(0.5)
        finally:
            stop(daemon)
        delays = [(seen[k] - t) * 1000 for k, t in committed.items() if k in seen]
        missing = len(committed) - len(delays)
        print(
            f"commit -> visible in PostgreSQL, {len(committed)} records at {rate}/s offered "
            f"over 10 workspaces for {seconds:g} s ({missing} not seen)"
        )
        print(f"  p50 {percentile(delays, 0.5):8.1f} ms   (target <= {LATENCY_P50_TARGET_MS:g})")
        print(f"  p99 {percentile(delays, 0.99):8.1f} ms   (target <= {LATENCY_P99_TARGET_MS:g})")
        print(f"  max {max(delays):8.1f} ms")
    finally:
        drop_database(name)


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def process_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return math.nan


def idle(count: int, seconds: float, workdir: Path) -> None:
    name = create_database()
    url = database_url(name)
    root = workdir / "idle"
    template = root / "ws0"
    template.mkdir(parents=True)
    WorkspaceDatabase(template).close()
    for n in range(1, count):
        shutil.copytree(template, root / f"ws{n}")
        conn = sqlite3.connect(database_path(root / f"ws{n}"))
        conn.execute("UPDATE workspace_meta SET value = ? WHERE key = 'origin_id'", (f"o{n}",))
        conn.commit()
        conn.close()
    try:
        daemon = start_daemon(root, url, workdir)
        try:
            time.sleep(5)  # the first sweep of every workspace
            before, started = process_cpu_seconds(daemon.pid), time.monotonic()
            time.sleep(seconds)
            used = process_cpu_seconds(daemon.pid) - before
            elapsed = time.monotonic() - started
            rss = process_rss_mb(daemon.pid)
            files = len(os.listdir(f"/proc/{daemon.pid}/fd"))
        finally:
            stop(daemon)
        print(f"idle, {count} workspaces watched, measured over {elapsed:.0f} s")
        print(
            f"  CPU   {100 * used / elapsed:6.2f} % of one core (target <= {IDLE_CPU_TARGET:g} %)"
        )
        print(f"  RSS   {rss:6.1f} MB (target <= {IDLE_RSS_TARGET_MB:g} MB)")
        print(f"  open files {files}")
    finally:
        drop_database(name)


def last_key(workspace: Path) -> str:
    conn = sqlite3.connect(database_path(workspace))
    try:
        row = conn.execute(
            "SELECT idempotency_key FROM outbox_records ORDER BY outbox_id DESC LIMIT 1"
        ).fetchone()
        return str(row[0])
    finally:
        conn.close()


async def held_count(conn: asyncpg.Connection, keys: list[str]) -> int:
    """How many of these keys (each an entity's last version) the entity rows hold."""
    by_table: dict[str, tuple[list[str], list[str]]] = {}
    for key in keys:
        entity_type, rest = key.split(":", 1)
        ids, held = by_table.setdefault(entity_type, ([], []))
        ids.append(rest[: -len(":2026-01-01T00:00:00.000000Z")])
        held.append(key)
    count = 0
    for entity_type, (ids, held) in by_table.items():
        spec = TABLES[entity_type]
        count += int(
            await conn.fetchval(
                f"SELECT count(*) FROM unnest($1::text[], $2::text[]) AS k(id, key) "
                f"JOIN acode.{spec.table} AS t "
                f"ON t.{spec.id_column} = k.id AND t.idempotency_key = k.key",
                ids,
                held,
            )
        )
    return count


async def wait_for_keys(url: str, keys: list[str]) -> asyncpg.Connection:
    """Poll until PostgreSQL holds every key, each its workspace's last record. A
    workspace ships its records oldest first, so its last record's version held means its
    backlog has arrived: 100 primary-key probes a poll."""
    conn = await asyncpg.connect(url)
    deadline = time.monotonic() + BACKLOG_TIMEOUT_SECONDS
    while await held_count(conn, keys) < len(keys):
        if time.monotonic() > deadline:
            await conn.close()
            raise SystemExit(f"the daemon did not ship the backlog in {BACKLOG_TIMEOUT_SECONDS} s")
        await anyio.sleep(BACKLOG_POLL_SECONDS)
    return conn


def migrate_postgres(url: str) -> None:
    subprocess.run(
        [Path(sys.executable).parent / "acode", "db", "migrate", "--postgres"],
        env={**os.environ, "ACODE_POSTGRES_URL": url},
        check=True,
        capture_output=True,
    )


async def drain_backlog(root: Path, url: str, workdir: Path, keys: list[str]) -> Measured:
    """The daemon from its start until PostgreSQL holds every key; its own CPU and its
    backends' (the poll's backend left out)."""
    backends = await BackendCpu.of(url)
    with backends:
        started = time.perf_counter()
        daemon = await anyio.to_thread.run_sync(start_daemon, root, url, workdir)
        try:
            poll = await wait_for_keys(url, keys)
            seconds = time.perf_counter() - started
            backends.exclude(await poll.fetchval("SELECT pg_backend_pid()"))
            backends.sample()  # before the daemon closes its pool
            daemon_cpu = process_cpu_seconds(daemon.pid)
            shipped = int(await poll.fetchval(COUNT_APPLIED_VERSIONS))
            await poll.close()
        finally:
            await anyio.to_thread.run_sync(stop, daemon)
    return Measured("acode-syncd", shipped, seconds, daemon_cpu, backends.seconds)


def backlog(records: int, workspaces: int, workdir: Path) -> None:
    name = create_database()
    url = database_url(name)
    root = workdir / "backlog"
    dirs = [root / f"ws-{n:04d}" for n in range(workspaces)]
    try:
        started = time.perf_counter()
        seeded = seed(dirs, records, 1)
        keys = [last_key(workspace) for workspace in dirs]
        source = workdir / "backlog-source.db"
        build_source(dirs, source)
        print(
            f"backlog: seeded {seeded.records:,} records into {workspaces} workspaces and "
            f"one SQLite file in {time.perf_counter() - started:.1f} s"
        )
        migrate_postgres(url)
        daemon = anyio.run(drain_backlog, root, url, workdir, keys, backend="asyncio")
        if daemon.records != seeded.records:
            raise SystemExit(f"the daemon shipped {daemon.records:,} of {seeded.records:,}")
        print(
            f"acode-syncd: {daemon.records:,} records from {workspaces} workspaces in "
            f"{daemon.seconds:.2f} s, from its start until PostgreSQL held every record"
        )
        pgloader, copy = anyio.run(
            run_baselines, source, url, seeded.records, print, backend="asyncio"
        )
        ways = [daemon, *([pgloader] if pgloader else []), copy]
        print("\n".join(comparison(ways, pgloader, copy)))
    finally:
        drop_database(name)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.bench_daemon", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--rate", type=int, default=1000, help="records/s offered")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long to offer them")
    parser.add_argument("--idle-workspaces", type=int, default=1000)
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument(
        "--backlog-records", type=int, default=0, help="records for the backlog part (0: skip)"
    )
    parser.add_argument("--backlog-workspaces", type=int, default=100)
    parser.add_argument("--only", choices=PARTS, action="append", help="run only these parts")
    args = parser.parse_args(argv)
    if args.backlog_records and args.backlog_records < args.backlog_workspaces:
        parser.error("need --backlog-records >= --backlog-workspaces")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="acode-bench-daemon-") as tmp:
        print(f"acode-syncd benchmark, Python {sys.version.split()[0]}")
        parts = args.only or PARTS
        if "latency" in parts:
            latency(args.rate, args.seconds, Path(tmp))
        if "idle" in parts:
            idle(args.idle_workspaces, args.idle_seconds, Path(tmp))
        if "backlog" in parts and args.backlog_records:
            backlog(args.backlog_records, args.backlog_workspaces, Path(tmp))


if __name__ == "__main__":
    main()
