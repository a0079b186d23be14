"""A fleet on one server: many independent daemons' worth of the real engine, through a
PgBouncer in transaction pooling, in a few processes.

    python -m tests.fleet.simulate --daemons 1000 --seconds 60             # steady load
    python -m tests.fleet.simulate --daemons 1000 --scenario cold-start
    python -m tests.fleet.simulate --daemons 1000 --scenario catch-up --pending 1000

Each simulated daemon is what `acode-syncd` runs for one workspace: its own workspace
(so its own origin), its own `Config`, `PostgresTarget` (a pool of one or two
connections, `statement_cache_size = 0`), `Metrics`, limiter and watchdog, and one
`WorkspaceWorker`, the daemon's own worker task. `--processes` child processes each run
their share of the daemons on one asyncio event loop, its workers woken by the daemon's
own inotify watcher. A writer per workspace saves SessionEvents through the real
`WorkspaceStore` at an agent's pace (a Poisson stream, `--rate` records/s on average,
including a burst of `--burst` back-to-back saves about every `--burst-every` seconds),
in writer processes of their own, one beside each daemon process: agents are other
processes than their daemon, and in the daemon's process their saves would take its
interpreter's time.

Scenarios:
- steady: the fleet under load for `--seconds`. Prints records/s offered and shipped,
  commit -> visible p50/p99 (the writer's clock after the commit against PostgreSQL's
  clock_timestamp() in a test-only audit trigger), PgBouncer's most client and server
  connections, the PostgreSQL server's CPU, warnings and errors by event and code, and
  the ledger: every key written is in PostgreSQL, written once.
- cold-start: every daemon starts at the same moment on an empty database with records
  pending: the migrations must be applied by exactly one transaction, no daemon logs a
  warning or an error, and every record must be in PostgreSQL within 10 s.
- catch-up: every workspace holds `--pending` records; the same copies are drained once
  straight into PostgreSQL (one daemon per process sharing a pool, the process's share
  of `--server-connections`) and once by the fleet through PgBouncer. Prints both rates
  and their ratio (target >= 0.8).

PostgreSQL's address comes from ACODE_TEST_POSTGRES_URL; PgBouncer and psql from Debian
(tests/bouncer.py); it runs as root (PgBouncer runs as postgres).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import anyio
import asyncpg

from acode_sync.config import Config, DaemonSettings, PostgresSettings, gather_seconds
from acode_sync.daemon import concurrent_syncs
from acode_sync.domain import Entity, Session, SessionEvent, idempotency_key
from acode_sync.log import configure_logging
from acode_sync.metrics import Metrics
from acode_sync.migrations import load_migrations
from acode_sync.postgres import DIALECT, PostgresTarget
from acode_sync.store import WorkspaceDatabase, WorkspaceStore
from acode_sync.sync import tune_interpreter
from acode_sync.watcher import make_watcher
from acode_sync.worker import Heartbeat, Shared, WorkspaceWorker
from acode_sync.workspace import OpenOptions, Synchronous
from tests.bench.bench_sync import not_processed
from tests.bouncer import PgBouncer, pgbouncer
from tests.pg import (
    ADMIN_URL,
    APPLIED_VERSION_KEYS,
    APPLIED_VERSIONS,
    AUDIT_TABLE,
    create_database,
    database_url,
    drop_database,
    install_audit,
)

P99_TARGET_SECONDS: Final = 2.0
COLD_START_TARGET_SECONDS: Final = 10.0
CATCH_UP_RATIO_TARGET: Final = 0.8
DRAIN_GRACE_SECONDS: Final = 60.0
# The children's common start, this long after the last of them has set up its
# workspaces (a late child says so in the report: its lateness counts against the figures).
START_DELAY_SECONDS: Final = 1.0
READY_POLL_SECONDS: Final = 0.1
SAMPLE_SECONDS: Final = 1.0
LAG_PROBE_SECONDS: Final = 0.1
COLD_START_RECORDS: Final = 5  # pending in each workspace before its daemon starts
CHILD_TIMEOUT: Final = 3600.0
ERROR_TEXT_CHARS: Final = 200  # of each warning's message, in the report
CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")


# -- one simulated daemon --------------------------------------------------------------


def daemon_shared(dsn: str, pool_max: int, gather: float | None = None) -> Shared:
    """What a Daemon gives its workers, built as Daemon.__init__ builds it. `gather`:
    [daemon] gather_seconds (None: its default)."""
    daemon = DaemonSettings(max_concurrent_syncs=pool_max)
    if gather is not None:
        daemon = dataclasses.replace(daemon, gather_seconds=gather)
    config = Config(
        postgres=PostgresSettings(
            dsn=dsn,
            pool_max=pool_max,
            statement_cache_size=0,  # behind a transaction-pooling PgBouncer
            connect_timeout=10.0,
            statement_timeout=30.0,
        ),
        daemon=daemon,
    )
    return Shared(
        config=config,
        target=PostgresTarget(config.postgres),
        metrics=Metrics(),
        limiter=anyio.CapacityLimiter(concurrent_syncs(config)),
        on_postgres=lambda up, refused: None,
        watchdog=Heartbeat(),
    )


@dataclass
class Member:
    workspace: Path
    shared: Shared
    worker: WorkspaceWorker


@dataclass(frozen=True)
class AgentPace:
    rate: float  # records/s on average, bursts included
    burst: int
    burst_every: float  # seconds between one workspace's bursts, on average

    @property
    def actions_per_second(self) -> float:
        return self.rate - self.burst / self.burst_every + 1 / self.burst_every

    def next_action(self, rng: random.Random) -> tuple[float, int]:
        """Seconds until the agent's next action, and how many records it saves."""
        pause = rng.expovariate(self.actions_per_second)
        is_burst = rng.random() < (1 / self.burst_every) / self.actions_per_second
        return pause, self.burst if is_burst else 1


async def write_like_an_agent(
    commits: list[tuple[str, float]],
    store: WorkspaceStore,
    pace: AgentPace,
    until: float,
    rng: random.Random,
) -> None:
    try:
        session = await store.save(Session(title="fleet"))
        commits.append((key_of(session), time.time()))
        n = 0
        while True:
            pause, count = pace.next_action(rng)
            if time.time() + pause >= until:
                return
            await anyio.sleep(pause)
            for _ in range(count):
                n += 1
                event = await store.append_event(session.session_id, "tool_output", {"n": n})
                commits.append((key_of(event), time.time()))
    finally:
        await store.aclose()


async def run_writers(spec: dict[str, Any]) -> dict[str, Any]:
    """The agents of a share of the fleet, in a process of their own as agents are: each
    saves at its pace; the daemons' inotify watchers see the commits."""
    workspaces = [Path(w) for w in spec["workspaces"]]
    for workspace in workspaces:
        workspace.mkdir(parents=True, exist_ok=True)
    stores = [await WorkspaceStore.open(w) for w in workspaces]
    pace = AgentPace(spec["rate"], spec["burst"], spec["burst_every"])
    rng = random.Random(spec["seed"])
    commits: list[tuple[str, float]] = []
    start_at = await ready_then_start(spec)
    late = max(0.0, time.time() - start_at)
    await wait_until(start_at)
    lags: list[float] = []
    probing = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(measure_lag, lags, probing)
        async with anyio.create_task_group() as writers:
            for store in stores:
                until = start_at + spec["seconds"]
                writers.start_soon(write_like_an_agent, commits, store, pace, until, rng)
        probing.set()
    writing_ended = time.time()
    await anyio.Path(spec["done"]).write_text("written")
    return {"commits": commits, "late": late, "writing_ended": writing_ended, "writer_lags": lags}


class Cancellable:
    """A task that can be cancelled alone (the watcher, once the workers have stopped)."""

    def __init__(self) -> None:
        self._scope = anyio.CancelScope()

    async def run(self, work: Awaitable[None]) -> None:
        with self._scope:
            await work

    def cancel(self) -> None:
        self._scope.cancel()


async def wake_on_commits(members: Sequence[Member]) -> None:
    """As the daemon wakes its workers: the inotify watcher on each `.agent` directory."""
    watcher = make_watcher()
    by_workspace = {m.workspace: m.worker for m in members}
    try:
        for workspace in by_workspace:
            watcher.add(workspace)
        while True:
            for workspace in (await watcher.changed()).workspaces:
                by_workspace[workspace].notify_change()
    finally:
        watcher.close()


def key_of(saved: Entity) -> str:
    assert saved.updated_at is not None  # stamped by the save
    return idempotency_key(saved.entity_type, saved.entity_id, saved.updated_at)


def seed(workspace: Path, records: int) -> list[str]:
    """A workspace with `records` pending (one session and its events), written quickly
    (synchronous NORMAL: nothing here needs to survive a power cut)."""
    db = WorkspaceDatabase(workspace, OpenOptions(synchronous=Synchronous.NORMAL))
    try:
        session = db.save(Session(title="catch-up"))
        keys = [key_of(session)]
        for n in range(records - 1):
            event = db.save(_event(session.session_id, n))
            keys.append(key_of(event))
        return keys
    finally:
        db.close()


def _event(session_id: str, n: int) -> SessionEvent:
    return SessionEvent(session_id=session_id, event_type="tool_output", payload={"n": n})


# -- a child process: its share of the fleet on one event loop -------------------------


async def ready_then_start(spec: dict[str, Any]) -> float:
    """Tell the parent this child is set up; the common start it then announces."""
    await anyio.Path(spec["ready"]).write_text("ready")
    go = anyio.Path(spec["go"])
    while not await go.exists():  # noqa: ASYNC110 - another process writes it
        await anyio.sleep(READY_POLL_SECONDS)
    return float(await go.read_text())


async def wait_until(moment: float) -> None:
    await anyio.sleep(max(0.0, moment - time.time()))


async def wait_drained(members: Sequence[Member], seconds: float) -> bool:
    with anyio.move_on_after(seconds):
        while True:
            # The workers' own backlogs, polled as the daemon's status loop reads them.
            while any(m.worker.backlog for m in members):  # noqa: ASYNC110
                await anyio.sleep(0.1)
            # Then each outbox itself: a worker not yet woken by the last commits still
            # shows the backlog it last read.
            left = [
                m for m in members if await anyio.to_thread.run_sync(not_processed, m.workspace)
            ]
            if not left:
                return True
            await anyio.sleep(0.5)
    return False


async def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    with open(spec["log"], "w") as log:  # noqa: ASYNC230 - before the event loop is busy
        configure_logging(level="warning", json_lines=True, stream=log)
        if spec["scenario"] == "writers":
            return await run_writers(spec)
        return await _run_members(spec)


async def _run_members(spec: dict[str, Any]) -> dict[str, Any]:
    scenario = spec["scenario"]
    workspaces = [Path(w) for w in spec["workspaces"]]
    if spec["shared_pool"]:  # one daemon for the whole process, as with direct connections
        one = daemon_shared(spec["dsn"], spec["shared_pool"], spec["gather"])
        shared = [one] * len(workspaces)
    else:  # a daemon each, pools of one or two connections
        shared = [
            daemon_shared(spec["dsn"], 1 + n % 2, spec["gather"]) for n in range(len(workspaces))
        ]
    for workspace in workspaces:
        workspace.mkdir(parents=True, exist_ok=True)
    if scenario == "cold-start":
        for workspace in workspaces:
            seed(workspace, COLD_START_RECORDS)
    members = [Member(w, s, WorkspaceWorker(w, s)) for w, s in zip(workspaces, shared, strict=True)]
    result: dict[str, Any] = {}
    try:
        spec["start_at"] = await ready_then_start(spec)
        result["late"] = max(0.0, time.time() - spec["start_at"])
        await wait_until(spec["start_at"])
        lags: list[float] = []
        probing = anyio.Event()
        watching = Cancellable()
        async with anyio.create_task_group() as tg:
            tg.start_soon(measure_lag, lags, probing)
            for member in members:
                await tg.start(member.worker.run)
            if scenario == "steady":
                # The workspaces exist by now: the writers made them before the start.
                tg.start_soon(watching.run, wake_on_commits(members))
                written = anyio.Path(spec["writers_done"])
                while not await written.exists():  # noqa: ASYNC110 - another process writes it
                    await anyio.sleep(READY_POLL_SECONDS)
            await anyio.sleep(0.5)  # the last wake-ups reach their workers
            result["drained"] = await wait_drained(members, DRAIN_GRACE_SECONDS)
            result["drained_at"] = time.time()
            for member in members:
                member.worker.stop()
            probing.set()
            watching.cancel()
        result["lags"] = lags
    finally:
        with anyio.CancelScope(shield=True):
            for target in {id(s.target): s.target for s in shared}.values():
                await target.close()
    result["batches"] = sum(batches_shipped(s.metrics) for s in {id(s): s for s in shared}.values())
    result["broken"] = [str(m.workspace) for m in members if m.worker.broken_code]
    return result


async def measure_lag(lags: list[float], done: anyio.Event) -> None:
    """How late this process's event loop wakes a sleeper: the time every callback (a
    worker's next statement, a writer's next save) waits for its turn."""
    while not done.is_set():
        before = time.perf_counter()
        await anyio.sleep(LAG_PROBE_SECONDS)
        lags.append(time.perf_counter() - before - LAG_PROBE_SECONDS)


def batches_shipped(metrics: Metrics) -> int:
    count = metrics.registry.get_sample_value("acode_sync_batch_duration_seconds_count")
    return int(count or 0)


def child_main(spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    if spec["scenario"] == "seed":
        keys = sum(len(seed(Path(w), spec["pending"])) for w in spec["workspaces"])
        Path(spec["out"]).write_text(json.dumps({"seeded": keys}))
        return
    tune_interpreter()  # as run_daemon does: the event loop gets the GIL back at once
    result = anyio.run(run_child, spec, backend="asyncio")
    Path(spec["out"]).write_text(json.dumps(result))


# -- the parent: PostgreSQL, PgBouncer, the children, the figures -----------------------


def raise_fd_limit() -> None:
    """Every daemon holds sockets and SQLite files; PgBouncer (a child) inherits this."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run_children(
    scenario: str,
    workspaces: Sequence[Path],
    *,
    dsn: str,
    args: argparse.Namespace,
    workdir: Path,
    shared_pool: int = 0,
) -> tuple[list[dict[str, Any]], float]:
    """The fleet split over --processes children; their results and the common start,
    announced once every child has set up its share."""
    go = workdir / f"{scenario}.go"
    children = []
    for n in range(args.processes):
        spec = {
            "scenario": scenario,
            "workspaces": [str(w) for w in workspaces[n :: args.processes]],
            "dsn": dsn,
            "shared_pool": shared_pool,
            "seconds": args.seconds,
            "rate": args.rate,
            "burst": args.burst,
            "burst_every": args.burst_every,
            "pending": args.pending,
            "gather": args.gather,
            "seed": args.seed * 1000 + n,
            "ready": str(workdir / f"{scenario}-{n}.ready"),
            "go": str(go),
            "log": str(workdir / f"{scenario}-{n}.log"),
            "out": str(workdir / f"{scenario}-{n}.json"),
        }
        if scenario == "steady":  # the agents, in processes of their own
            writers = {
                **spec,
                "scenario": "writers",
                **{k: str(workdir / f"writers-{n}.{k}") for k in ("ready", "log", "out", "done")},
            }
            spec["writers_done"] = writers["done"]
            children.append(_start_child(workdir / f"writers-{n}.spec.json", writers))
        children.append(_start_child(workdir / f"{scenario}-{n}.spec.json", spec))
    start_at = 0.0
    if scenario != "seed":
        while not all(Path(spec["ready"]).exists() for _, spec in children):
            if any(process.poll() is not None for process, _ in children):
                break  # a child failed while setting up: reported below
            time.sleep(READY_POLL_SECONDS)
        start_at = time.time() + START_DELAY_SECONDS
        go.with_suffix(".tmp").write_text(repr(start_at))
        go.with_suffix(".tmp").rename(go)  # whole, for the children polling for it
    results = []
    for process, spec in children:
        if process.wait(CHILD_TIMEOUT) != 0:
            raise RuntimeError(f"a fleet process failed ({process.returncode}): {spec['log']}")
        results.append(json.loads(Path(spec["out"]).read_text()))
    return results, start_at


def _start_child(
    path: Path, spec: dict[str, Any]
) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    path.write_text(json.dumps(spec))
    command = [sys.executable, "-m", "tests.fleet.simulate", "--child", str(path)]
    return subprocess.Popen(command), spec


def log_problems(workdir: Path, scenario: str) -> Counter[str]:
    """Warnings and errors the daemons logged, by event and code."""
    found: Counter[str] = Counter()
    for path in sorted(workdir.glob(f"{scenario}-*.log")):
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                found[f"unparsed: {line[:80]}"] += 1
                continue
            what = f"{entry.get('level')}: {entry.get('event')} {entry.get('code', '')}"
            found[f"{what} {entry.get('error', '')}".strip()[:ERROR_TEXT_CHARS]] += 1
    return found


def server_cpu_seconds() -> float:
    """CPU seconds of the whole PostgreSQL server so far (its processes, and the children
    it has reaped), from /proc. The server is shared with other jobs on this machine."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        name, fields = stat[stat.index("(") + 1 : stat.rindex(")")], stat.rsplit(")", 1)[1].split()
        if name not in ("postgres", "postmaster"):
            continue
        total += int(fields[11]) + int(fields[12])
        parent = Path(f"/proc/{fields[1]}/stat")
        if parent.exists() and "(postgres)" not in parent.read_text():  # the postmaster
            total += int(fields[13]) + int(fields[14])
    return total / CLOCK_TICKS


@dataclass
class BouncerPeaks:
    clients: int = 0
    servers: int = 0
    waiting: int = 0
    # CPU ticks of each backend of the fleet's database, as last read: the database's own
    # share of the server, which other jobs on this machine share.
    backend_ticks: dict[int, int] = field(default_factory=dict)

    @property
    def backend_seconds(self) -> float:
        return sum(self.backend_ticks.values()) / CLOCK_TICKS


def process_ticks(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])


@contextmanager
def sampling(bouncer: PgBouncer, database: str) -> Iterator[BouncerPeaks]:
    """The most client and server connections PgBouncer showed for the database."""
    peaks = BouncerPeaks()
    done = threading.Event()

    backends = f"SELECT pid FROM pg_stat_activity WHERE datname = '{database}'"

    def sample() -> None:
        while not done.wait(SAMPLE_SECONDS):
            for (pid,) in anyio.run(fetch, ADMIN_URL, backends):
                ticks = process_ticks(int(pid))
                if ticks is not None:
                    peaks.backend_ticks[int(pid)] = ticks
            for row in bouncer.show("POOLS"):
                if row["database"] != database:
                    continue
                clients = int(row["cl_active"]) + int(row["cl_waiting"])
                servers = sum(
                    int(row[key])
                    for key in ("sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login")
                )
                peaks.clients = max(peaks.clients, clients)
                peaks.servers = max(peaks.servers, servers)
                peaks.waiting = max(peaks.waiting, int(row["cl_waiting"]))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peaks
    finally:
        done.set()
        thread.join()


async def fetch(dsn: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


def loop_lag_line(results: Sequence[dict[str, Any]]) -> str:
    lags = [lag for r in results for lag in r.get("lags", ())] or [0.0]
    return (
        f"simulator event loops: late by p50 {percentile(lags, 0.5) * 1000:,.0f} ms, "
        f"p99 {percentile(lags, 0.99) * 1000:,.0f} ms"
    )


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


@dataclass
class Ledger:
    written: int
    lost: int
    twice: int
    unexpected: int

    @property
    def ok(self) -> bool:
        return self.written > 0 and self.lost == self.twice == self.unexpected == 0

    def line(self) -> str:
        verdict = "ok" if self.ok else "FAILED"
        return (
            f"ledger {verdict}: {self.written} written, {self.lost} lost, "
            f"{self.twice} applied twice, {self.unexpected} not written"
        )


def ledger(written: Sequence[str], audited: Sequence[str], applied: Sequence[str]) -> Ledger:
    """Nothing lost (every key applied, tests.pg.APPLIED_VERSION_KEYS), nothing applied
    twice (one audit row each: the audit table has no unique key)."""
    audit = Counter(audited)
    keys = set(written)
    return Ledger(
        written=len(written),
        lost=len(keys - set(applied)) + len(keys - set(audit)),
        twice=sum(1 for count in audit.values() if count > 1),
        unexpected=len(set(audit) - keys),
    )


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=dict)  # what -> met

    def say(self, line: str) -> None:
        print(line, flush=True)
        self.lines.append(line)

    def check(self, ok: bool, what: str) -> None:
        self.say(f"  {'met' if ok else 'MISSED'}: {what}")
        self.checks[what] = ok

    @property
    def failures(self) -> list[str]:
        return [what for what, ok in self.checks.items() if not ok]


def steady(args: argparse.Namespace, workdir: Path, report: Report) -> None:
    name = create_database()
    try:
        direct = database_url(name)
        anyio.run(ready_database, direct)
        with fleet_bouncer(args) as bouncer:
            cpu_before, wall_before = server_cpu_seconds(), time.time()
            workspaces = [workdir / "steady" / f"ws{n}" for n in range(args.daemons)]
            with sampling(bouncer, name) as peaks:
                results, start_at = run_children(
                    "steady", workspaces, dsn=bouncer.url(direct), args=args, workdir=workdir
                )
            elapsed = time.time() - wall_before
            cpu = (server_cpu_seconds() - cpu_before) / elapsed
        commits = {key: at for r in results for key, at in r.get("commits", ())}
        rows = anyio.run(
            fetch, direct, f"SELECT idempotency_key, extract(epoch FROM at) FROM {AUDIT_TABLE}"
        )
        applied = anyio.run(fetch, direct, APPLIED_VERSION_KEYS)
        visible: dict[str, float] = {str(r[0]): float(r[1]) for r in rows}
        latencies = [visible[key] - at for key, at in commits.items() if key in visible]
        account = ledger(list(commits), [str(r[0]) for r in rows], [str(r[0]) for r in applied])
        writing = max(r.get("writing_ended", 0.0) for r in results) - start_at
        batches = sum(r.get("batches", 0) for r in results)
        last_visible = max(visible.values(), default=start_at)
        problems = log_problems(workdir, "steady") + log_problems(workdir, "writers")
        report.say(
            f"steady: {args.daemons} daemons in {args.processes} processes, {args.seconds:g} s, "
            f"{args.rate:g} records/s each (bursts of {args.burst} every ~{args.burst_every:g} s), "
            f"gather_seconds {gather_of(args):g}"
        )
        report.say(
            f"  offered {len(commits) / writing:,.0f} records/s, "
            f"shipped {len(visible) / (last_visible - start_at):,.0f} records/s "
            f"({len(visible):,} of {len(commits):,}) in {batches:,} batches "
            f"({len(visible) / max(1, batches):.1f} records each)"
        )
        p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
        report.say(
            f"  commit -> visible p50 {p50 * 1000:,.0f} ms, p99 {p99 * 1000:,.0f} ms, "
            f"max {max(latencies) * 1000:,.0f} ms"
        )
        report.say(
            f"  PgBouncer: at most {peaks.clients} client connections "
            f"({peaks.waiting} waiting), {peaks.servers} server connections"
        )
        own = peaks.backend_seconds
        report.say(
            f"  PostgreSQL CPU: the fleet database's backends {own / elapsed * 100:.0f}% of one "
            f"core, {own / max(1, batches) * 1000:.1f} ms per batch; the whole server "
            f"{cpu * 100:.0f}%"
        )
        report.say(f"  {loop_lag_line(results)}")
        report.say(f"  warnings and errors: {dict(problems) or 'none'}")
        report.say(f"  {account.line()}")
        report.check(account.ok, "all offered load shipped, nothing twice")
        report.check(p99 <= P99_TARGET_SECONDS, f"p99 <= {P99_TARGET_SECONDS:g} s")
        report.check(peaks.servers <= args.server_connections, "server connections within the pool")
        report.check(not problems and all(not r.get("broken") for r in results), "zero errors")
    finally:
        drop_database(name)


def cold_start(args: argparse.Namespace, workdir: Path, report: Report) -> None:
    name = create_database()
    try:
        direct = database_url(name)
        with fleet_bouncer(args) as bouncer:
            workspaces = [workdir / "cold" / f"ws{n}" for n in range(args.daemons)]
            with sampling(bouncer, name) as peaks:
                results, start_at = run_children(
                    "cold-start", workspaces, dsn=bouncer.url(direct), args=args, workdir=workdir
                )
        migrations = anyio.run(
            fetch,
            direct,
            "SELECT count(*), count(DISTINCT created_at) FROM acode.schema_migrations",
        )[0]
        applied = anyio.run(
            fetch,
            direct,
            "SELECT count(*), count(DISTINCT idempotency_key), "
            "extract(epoch FROM max(applied_at)), "
            "extract(epoch FROM percentile_disc(0.5) WITHIN GROUP (ORDER BY applied_at)), "
            "extract(epoch FROM percentile_disc(0.9) WITHIN GROUP (ORDER BY applied_at)), "
            "(SELECT extract(epoch FROM max(created_at)) FROM acode.schema_migrations) "
            f"FROM ({APPLIED_VERSIONS}) AS applied",
        )[0]
        problems = log_problems(workdir, "cold-start")
        late = max(r["late"] for r in results)
        expected = args.daemons * COLD_START_RECORDS
        shipped_in = float(applied[2] or 0) - start_at
        report.say(
            f"cold start: {args.daemons} daemons at once on an empty database, "
            f"{COLD_START_RECORDS} records pending each (the last process started "
            f"{late:.1f} s late)"
        )
        report.say(
            f"  {migrations[0]} migrations applied by {migrations[1]} transaction(s); "
            f"{applied[1]:,} of {expected:,} records in PostgreSQL ({applied[0]:,} keys), the last "
            f"{shipped_in:.1f} s after the start; PgBouncer at most {peaks.clients} clients, "
            f"{peaks.servers} servers"
        )
        if applied[0]:
            half, most, migrated = (float(v) - start_at for v in applied[3:6])
            report.say(
                f"  the migrations committed {migrated:.1f} s after the start; half the "
                f"records were in PostgreSQL {half:.1f} s after it, 90 % {most:.1f} s"
            )
        report.say(f"  warnings and errors: {dict(problems) or 'none'}")
        report.check(
            migrations[0] == len(load_migrations(DIALECT)) and migrations[1] == 1,
            "exactly one daemon applied the migrations",
        )
        report.check(not problems and all(not r.get("broken") for r in results), "none failed")
        report.check(applied[0] == applied[1] == expected, "every record shipped once")
        report.check(
            shipped_in <= COLD_START_TARGET_SECONDS,
            f"all shipped within {COLD_START_TARGET_SECONDS:g} s",
        )
    finally:
        drop_database(name)


def catch_up(args: argparse.Namespace, workdir: Path, report: Report) -> None:
    seeded_dir = workdir / "seeded"
    workspaces = [seeded_dir / f"ws{n}" for n in range(args.daemons)]
    for workspace in workspaces:
        workspace.mkdir(parents=True)
    seeded, _ = run_children("seed", workspaces, dsn="", args=args, workdir=workdir)
    total = sum(r["seeded"] for r in seeded)
    report.say(
        f"catch-up: {args.daemons} workspaces with {args.pending:,} pending records each "
        f"({total:,} in all)"
    )
    rates = {}
    for how in ("direct", "pgbouncer"):
        copies = [workdir / how / w.name for w in workspaces]
        shutil.copytree(seeded_dir, workdir / how)
        name = create_database()
        try:
            url = database_url(name)
            anyio.run(ready_database, url)
            if how == "direct":
                # One daemon per process sharing a pool: the server connections of the
                # fleet's PgBouncer, spent without one.
                pool = max(1, args.server_connections // args.processes)
                results, start_at = run_children(
                    how, copies, dsn=url, args=args, workdir=workdir, shared_pool=pool
                )
                arrangement = f"{args.processes} daemons with pools of {pool}, direct"
            else:
                with fleet_bouncer(args) as bouncer:
                    results, start_at = run_children(
                        how, copies, dsn=bouncer.url(url), args=args, workdir=workdir
                    )
                arrangement = (
                    f"{args.daemons} daemons with pools of 1-2, PgBouncer with "
                    f"{args.server_connections} server connections"
                )
            counts = anyio.run(
                fetch, url, f"SELECT count(*), count(DISTINCT idempotency_key) FROM {AUDIT_TABLE}"
            )[0]
        finally:
            drop_database(name)
        shutil.rmtree(workdir / how, ignore_errors=True)
        seconds = max(r["drained_at"] for r in results) - start_at
        rates[how] = counts[1] / seconds
        problems = log_problems(workdir, how)
        report.say(
            f"  {how}: {rates[how]:,.0f} records/s ({arrangement}; {seconds:.1f} s); "
            f"{counts[1]:,} of {total:,} shipped, {counts[0] - counts[1]} applied twice; "
            f"warnings and errors: {dict(problems) or 'none'}"
        )
        report.check(counts[0] == counts[1] == total and not problems, f"{how}: ledger, no errors")
    ratio = rates["pgbouncer"] / rates["direct"]
    report.say(f"  pgbouncer / direct = {ratio:.2f}")
    report.check(ratio >= CATCH_UP_RATIO_TARGET, f"ratio >= {CATCH_UP_RATIO_TARGET:g}")


async def ready_database(url: str) -> None:
    target = PostgresTarget(PostgresSettings(dsn=url))
    try:
        await target.ensure_schema()
    finally:
        await target.close()
    await install_audit(url)


def gather_of(args: argparse.Namespace) -> float:
    """The gather every simulated daemon uses (its default: behind PgBouncer)."""
    return gather_seconds(daemon_shared("postgresql://fleet/", 1, args.gather).config)


@contextmanager
def fleet_bouncer(args: argparse.Namespace) -> Iterator[PgBouncer]:
    pool = args.server_connections
    with pgbouncer(
        default_pool_size=pool,
        max_db_connections=pool,
        max_client_conn=max(2500, args.daemons * 3),
    ) as bouncer:
        yield bouncer


SCENARIOS: Final = {"steady": steady, "cold-start": cold_start, "catch-up": catch_up}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="steady")
    parser.add_argument("--daemons", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=2.0, help="records/s per workspace")
    parser.add_argument("--burst", type=int, default=50)
    parser.add_argument("--burst-every", type=float, default=100.0)
    parser.add_argument("--pending", type=int, default=1000, help="per workspace (catch-up)")
    parser.add_argument("--server-connections", type=int, default=20)
    parser.add_argument(
        "--gather", type=float, help="[daemon] gather_seconds of every daemon (default: unset)"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Report:
    args = parse_args(argv)
    if args.child:
        child_main(args.child)
        return Report()
    raise_fd_limit()
    report = Report()
    report.say(f"PostgreSQL {ADMIN_URL.rsplit('@', 1)[-1]}, {time.strftime('%Y-%m-%d %H:%M')}")
    chosen = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    workdir = Path(tempfile.mkdtemp(prefix="acode-fleet-"))
    try:
        for scenario in chosen:
            SCENARIOS[scenario](args, workdir, report)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return report


if __name__ == "__main__":
    sys.exit(1 if main().failures else 0)
