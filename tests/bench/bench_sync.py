"""Throughput of the sync engine: outbox records shipped from workspaces into PostgreSQL.

    python -m tests.bench.bench_sync [--records 100000] [--workspaces 100]

Creates a fresh PostgreSQL database and N workspaces, and seeds them with pending outbox
records of ~1 KB (sessions, tasks, steps, tool calls, artifacts and events, ~10% of them
updates of earlier entities of the same workspace) written in bulk transactions, in
child processes, through the store's own SQL. Then drains every workspace with the real
engine: one PostgresTarget shared by WorkspaceSyncer.drain() calls, at most --concurrency
at once, and reports:

- records/s over the wall time of the whole drain (prune and checkpoint included);
- the latency of each batch's PostgresTarget.apply (one PostgreSQL transaction);
- the peak RSS of this process (seeding runs in child processes, so it is not counted);
- the latency of an agent's saves (WorkspaceDatabase.save of a Session update every
  ~5 ms, synchronous=FULL) in a separate process, into one of the workspaces drained,
  while the drain runs at the CPU priority the systemd unit gives the daemon (Nice=,
  CPUSchedulingPolicy=) and the agent at the normal one; and, as its baseline, the same
  agent's saves into a workspace no syncer reads while pgloader and COPY load
  PostgreSQL (what a save pays for sharing this machine's disk with the server);

verifies that PostgreSQL holds every key and no record is left pending, and, in the same
run, times the baselines (tests/bench/baselines.py): pgloader loading the same records
from one SQLite file (skipped, saying so, where it is not installed), a binary COPY of
them into a typed table (the ceiling) and, on a fresh sample, a naive row-at-a-time relay
(one PostgreSQL transaction and one SQLite UPDATE per record). Prints each as records/s,
as a ratio to pgloader and to COPY, and its CPU per record on both sides.

--no-baselines drains only (to compare the engine of two commits on the same records).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import random
import resource
import secrets
import shutil
import sqlite3
import string
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.to_thread
import asyncpg
import structlog

import acode_sync
from acode_sync.config import DaemonSettings, PostgresSettings, SyncSettings
from acode_sync.domain import (
    Artifact,
    Entity,
    Session,
    SessionEvent,
    SessionState,
    SessionTask,
    Step,
    ToolCall,
    format_timestamp,
    idempotency_key,
    parse_timestamp,
    utc_now,
)
from acode_sync.log import configure_logging
from acode_sync.pg_tables import TABLES, Kind, TableSpec
from acode_sync.postgres import BatchOutcome, PostgresTarget
from acode_sync.sql import queries
from acode_sync.store import WorkspaceDatabase, encode_json
from acode_sync.sync import SyncSummary, WorkspaceSyncer, tune_interpreter
from acode_sync.workspace import database_path
from tests.bench.baselines import (
    BackendCpu,
    Measured,
    build_source,
    comparison,
    own_cpu,
    run_baselines,
)
from tests.bench.bench_store import outbox_row, percentile
from tests.pg import ADMIN_URL, COUNT_APPLIED_VERSIONS, database_url

# The drain's records/s against pgloader's on the same records in the same run (the
# machine's speed drifts between runs; a ratio from one run does not).
PGLOADER_RATIO_TARGET_ONE: Final = 1.5  # 1M records from one workspace
PGLOADER_RATIO_TARGET_MANY: Final = 2.0  # 1M records from 100 workspaces
RSS_TARGET_MB: Final = 150.0
AGENT_SAVE_TARGET_MS: Final = 5.0
AGENT_INTERVAL: Final = 0.005
AGENT_WARMUP_SAVES: Final = 5
NAIVE_MAX_RECORDS: Final = 20_000
DAEMON_CONCURRENCY: Final = DaemonSettings().max_concurrent_syncs
POOL_MAX: Final = 10
PLAN_CACHE_MODES: Final = ("auto", "force_custom_plan", "force_generic_plan")
UPDATE_FRACTION: Final = 0.10
SEED_CHUNK: Final = 20_000  # records per seeding transaction
RECENT_WINDOW: Final = 4096  # updates pick among this many recently created entities
PAD_LENGTHS: Final = (600, 900)  # free text per record: a ~1 KB payload on average
PAD_POOL: Final = 64
NEW_ENTITY_WEIGHTS: Final = (
    ("Session", 4),
    ("SessionTask", 8),
    ("Step", 16),
    ("ToolCall", 32),
    ("Artifact", 10),
    ("SessionEvent", 30),
)
# Parents first, so the foreign keys hold within a seeding transaction.
TABLE_ORDER: Final = (
    "sessions",
    "session_tasks",
    "steps",
    "tool_calls",
    "artifacts",
    "session_events",
)
NEXT_STATE: Final = {
    SessionState.CREATED: SessionState.PLANNING,
    SessionState.PLANNING: SessionState.EXECUTING,
    SessionState.EXECUTING: SessionState.PAUSED,
    SessionState.PAUSED: SessionState.EXECUTING,
}
NEXT_STATUS: Final = {"pending": "running", "running": "done", "done": "done"}
_Q = queries("sqlite")

# --------------------------------------------------------------------------- seeding


class RecordGenerator:
    """One workspace's stream of saves, as the store would stamp them.

    A new entity hangs off a recent parent; an update picks an entity among the most
    recently created ones and bumps its version. Timestamps advance a few microseconds a
    record from `base`, so every version is strictly after the previous one.
    """

    def __init__(self, rng: random.Random, base: datetime) -> None:
        self.rng = rng
        self.base = base
        self.micros = 0
        alphabet = string.ascii_lowercase + "      "
        self.pads = [
            "".join(rng.choices(alphabet, k=rng.randint(*PAD_LENGTHS))) for _ in range(PAD_POOL)
        ]
        kinds, weights = zip(*NEW_ENTITY_WEIGHTS, strict=True)
        self.kinds: tuple[str, ...] = kinds
        self.weights: tuple[int, ...] = weights
        self.latest: dict[str, Entity] = {}
        self.recent: list[str] = []
        self.recent_slot = 0
        self.session: Session | None = None
        self.tasks: list[SessionTask] = []
        self.steps: list[Step] = []
        self.created = 0

    def pad(self) -> str:
        return self.rng.choice(self.pads)

    def tick(self) -> str:
        self.micros += self.rng.randint(3, 40)
        return format_timestamp(self.base + timedelta(microseconds=self.micros))

    def next(self) -> tuple[Entity, str | None]:
        """(the entity as saved, the version it replaced or None)."""
        stamp = self.tick()
        if self.recent and self.rng.random() < UPDATE_FRACTION:
            return self._update(stamp)
        return self._new(stamp), None

    def _remember(self, entity: Entity) -> None:
        self.created += 1
        self.latest[entity.entity_id] = entity
        if len(self.recent) < RECENT_WINDOW:
            self.recent.append(entity.entity_id)
            return
        del self.latest[self.recent[self.recent_slot]]
        self.recent[self.recent_slot] = entity.entity_id
        self.recent_slot = (self.recent_slot + 1) % RECENT_WINDOW

    def _new(self, stamp: str) -> Entity:
        kind = self.rng.choices(self.kinds, self.weights)[0]
        if self.session is None:
            kind = "Session"
        elif kind in ("Step", "ToolCall") and not self.tasks:
            kind = "SessionTask"
        elif kind == "ToolCall" and not self.steps:
            kind = "Step"
        entity: Entity
        if kind == "Session" or self.session is None:
            n = self.created
            self.session = Session(
                title=f"session {n}",
                metadata={"model": "bench", "notes": self.pad()},
                created_at=stamp,
                updated_at=stamp,
            )
            entity = self.session
        elif kind == "SessionTask":
            task = SessionTask(
                session_id=self.session.session_id,
                title=self.pad(),
                created_at=stamp,
                updated_at=stamp,
            )
            self.tasks = [*self.tasks[-7:], task]
            entity = task
        elif kind == "Step":
            parent = self.rng.choice(self.tasks)
            step = Step(
                task_id=parent.task_id,
                session_id=parent.session_id,
                description=self.pad(),
                created_at=stamp,
                updated_at=stamp,
            )
            self.steps = [*self.steps[-7:], step]
            entity = step
        elif kind == "ToolCall":
            where = self.rng.choice(self.steps)
            entity = ToolCall(
                step_id=where.step_id,
                session_id=where.session_id,
                name="run_command",
                arguments={"command": "pytest -q", "stdin": self.pad()},
                created_at=stamp,
                updated_at=stamp,
            )
        elif kind == "Artifact":
            entity = Artifact(
                session_id=self.session.session_id,
                type="diff",
                content=self.pad(),
                name=f"patch-{self.created}.diff",
                created_at=stamp,
                updated_at=stamp,
            )
        else:
            entity = SessionEvent(
                session_id=self.session.session_id,
                event_type="message",
                payload={"role": "assistant", "text": self.pad()},
                created_at=stamp,
                updated_at=stamp,
            )
        self._remember(entity)
        return entity

    def _update(self, stamp: str) -> tuple[Entity, str | None]:
        current = self.latest[self.rng.choice(self.recent)]
        changes: dict[str, Any]
        if isinstance(current, Session):
            changes = {"state": NEXT_STATE[current.state], "title": f"{current.title} (edited)"}
        elif isinstance(current, SessionTask | Step):
            changes = {"status": NEXT_STATUS[current.status]}
        elif isinstance(current, ToolCall):
            changes = {"status": "done", "result": {"exit_code": 0, "output": "1 passed"}}
        elif isinstance(current, Artifact):
            changes = {"content": self.pad()}
        else:
            changes = {"payload": {"role": "assistant", "text": self.pad(), "edited": True}}
        saved = replace(current, updated_at=stamp, **changes)
        self.latest[saved.entity_id] = saved
        return saved, current.updated_at


@dataclass(frozen=True, slots=True)
class SeedResult:
    records: int
    entities: int
    payload_bytes: int
    counts: tuple[int, ...] = ()  # records per workspace


def seed_workspace(workspace: str, records: int, seed: int, base: str) -> SeedResult:
    """Write `records` saves into a created workspace, SEED_CHUNK per transaction: entity
    rows through the store's save_* upserts, outbox rows through insert_outbox."""
    generator = RecordGenerator(random.Random(seed), parse_timestamp(base))
    conn = sqlite3.connect(database_path(Path(workspace)), isolation_level=None)
    payload_bytes = 0
    try:
        conn.execute("PRAGMA foreign_keys = ON")
        done = 0
        while done < records:
            count = min(SEED_CHUNK, records - done)
            rows: dict[str, list[dict[str, Any]]] = {table: [] for table in TABLE_ORDER}
            outbox: list[tuple[Any, ...]] = []
            for _ in range(count):
                saved, previous = generator.next()
                row = saved.row()
                payload = encode_json(row)
                payload_bytes += len(payload)
                assert saved.updated_at is not None
                outbox.append(
                    outbox_row(
                        idempotency_key(saved.entity_type, saved.entity_id, saved.updated_at),
                        saved.entity_type,
                        saved.entity_id,
                        saved.session_id,
                        payload,
                        previous,
                        saved.updated_at,  # the store's clock reading for this save
                    )
                )
                for column in saved.json_columns:
                    if row[column] is not None:
                        row[column] = encode_json(row[column])
                rows[saved.table].append(row)
            conn.execute("BEGIN IMMEDIATE")
            for table in TABLE_ORDER:
                conn.executemany(_Q[f"save_{table}"], rows[table])
            conn.executemany(_Q["insert_outbox"], outbox)
            conn.execute("COMMIT")
            done += count
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return SeedResult(records, generator.created, payload_bytes)


def seed(workspaces: Sequence[Path], records: int, first_seed: int) -> SeedResult:
    """Create the workspaces (schema, origin), then seed them in parallel processes."""
    for workspace in workspaces:
        workspace.mkdir(parents=True)
        WorkspaceDatabase(workspace).close()
    share, extra = divmod(records, len(workspaces))
    counts = [share + (1 if i < extra else 0) for i in range(len(workspaces))]
    base = format_timestamp(utc_now() - timedelta(days=1))
    workers = max(1, min(os.cpu_count() or 1, len(workspaces)))
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        results = list(
            pool.map(
                seed_workspace,
                [str(w) for w in workspaces],
                counts,
                [first_seed + i for i in range(len(workspaces))],
                [base] * len(workspaces),
            )
        )
    return SeedResult(
        records=sum(r.records for r in results),
        entities=sum(r.entities for r in results),
        payload_bytes=sum(r.payload_bytes for r in results),
        counts=tuple(counts),
    )


# --------------------------------------------------------------------------- the agent


def agent_main(
    workspace: str, interval: float, ready: Event, stop: Event, results: Connection
) -> None:
    """A separate process saving a Session update every `interval` seconds until stopped;
    sends back (session_id, saves in all, [(start_ns, duration_ns), ...])."""
    database = WorkspaceDatabase(Path(workspace))
    try:
        session_id = database.save(Session(title="agent")).session_id
        saves = 1
        for i in range(AGENT_WARMUP_SAVES):
            database.save(Session(session_id=session_id, title=f"agent warm-up {i}"))
            saves += 1
        ready.set()
        samples: list[tuple[int, int]] = []
        tick = time.perf_counter()
        while not stop.is_set():
            update = Session(session_id=session_id, title=f"agent {saves}", metadata={"n": saves})
            started = time.perf_counter_ns()
            database.save(update)
            samples.append((started, time.perf_counter_ns() - started))
            saves += 1
            tick += interval
            pause = tick - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            else:
                tick = time.perf_counter()
        results.send((session_id, saves, samples))
    finally:
        database.close()
        results.close()


@dataclass(slots=True)
class Agent:
    workspace: Path
    process: multiprocessing.process.BaseProcess
    ready: Event
    stop: Event
    results: Connection

    @classmethod
    def start(cls, workspace: Path) -> Agent:
        context = multiprocessing.get_context("spawn")
        ready, stop = context.Event(), context.Event()
        receiving, sending = context.Pipe(duplex=False)
        process = context.Process(
            target=agent_main,
            args=(str(workspace), AGENT_INTERVAL, ready, stop, sending),
            name="bench-agent",
            daemon=True,
        )
        process.start()
        sending.close()
        return cls(workspace, process, ready, stop, receiving)

    def wait_ready(self, timeout: float = 60.0) -> None:
        if not self.ready.wait(timeout):
            raise SystemExit("the agent process did not start")

    def finish(self, timeout: float = 60.0) -> tuple[str, int, list[tuple[int, int]]]:
        self.stop.set()
        try:
            if not self.results.poll(timeout):
                raise SystemExit("the agent process did not report")
            session_id, saves, samples = self.results.recv()
        finally:
            self.results.close()
            self.process.join(timeout)
            if self.process.is_alive():
                self.process.terminate()
                self.process.join()
        return session_id, saves, samples


# --------------------------------------------------------------------------- the drain


class TimedTarget(PostgresTarget):
    """The real target, timing each apply (one batch, one PostgreSQL transaction)."""

    def __init__(self, settings: PostgresSettings) -> None:
        super().__init__(settings)
        self.apply_ns: list[int] = []

    async def apply(self, *args: Any, **kwargs: Any) -> BatchOutcome:
        started = time.perf_counter_ns()
        try:
            return await super().apply(*args, **kwargs)
        finally:
            self.apply_ns.append(time.perf_counter_ns() - started)


@dataclass(slots=True)
class DrainResult:
    seconds: float
    started_ns: int
    ended_ns: int
    shipped: int
    batches: int
    conflicts: int
    failed: int
    windows: dict[Path, tuple[int, int]] = field(default_factory=dict)


async def drain_all(
    target: PostgresTarget,
    workspaces: Sequence[Path],
    concurrency: int,
    settings: SyncSettings,
    max_batches: dict[Path, int],
) -> DrainResult:
    """Drain every workspace, at most `concurrency` at once. A workspace listed in
    `max_batches` (the agent's) stops after that many batches: the agent keeps saving, so
    its drain would otherwise chase the agent's saves one small batch at a time."""
    limiter = anyio.CapacityLimiter(concurrency)
    windows: dict[Path, tuple[int, int]] = {}
    summaries: list[SyncSummary] = []

    async def drain_one(workspace: Path) -> None:
        async with limiter:
            started = time.perf_counter_ns()
            syncer = WorkspaceSyncer(workspace=workspace, target=target, settings=settings)
            summaries.append(await syncer.drain(max_batches=max_batches.get(workspace)))
            windows[workspace] = (started, time.perf_counter_ns())

    started = time.perf_counter_ns()
    async with anyio.create_task_group() as group:
        for workspace in workspaces:
            group.start_soon(drain_one, workspace)
    ended = time.perf_counter_ns()
    return DrainResult(
        seconds=(ended - started) / 1e9,
        started_ns=started,
        ended_ns=ended,
        shipped=sum(s.applied + s.duplicates + s.conflicts for s in summaries),
        batches=sum(s.batches for s in summaries),
        conflicts=sum(s.conflicts for s in summaries),
        failed=sum(s.retried + s.dead for s in summaries),
        windows=windows,
    )


def not_processed(workspace: Path, up_to: int | None = None) -> int:
    """Records not processed (pending or dead), among the first `up_to` if given."""
    conn = sqlite3.connect(database_path(workspace))
    try:
        row = conn.execute(
            "SELECT count(*) FROM outbox WHERE state <> 'processed' AND outbox_id <= ?",
            (sys.maxsize if up_to is None else up_to,),
        ).fetchone()
        return int(row[0])
    finally:
        conn.close()


# --------------------------------------------------------------------------- the baseline

_NAIVE_KEY = (
    "INSERT INTO applied_keys (session_id, idempotency_key, version, payload_digest, "
    "origin_id) VALUES ($1, $2, right($2, 27)::timestamptz, $3, $4) "
    "ON CONFLICT (idempotency_key, session_id, version) DO NOTHING"
)


def naive_upsert_sql(spec: TableSpec) -> str:
    """One entity per statement, typed columns bound as text and cast by PostgreSQL."""
    names = [column.name for column in spec.columns]
    values = [
        f"${i}" if column.kind is Kind.TEXT else f"${i}::text::{column.kind.value}"
        for i, column in enumerate(spec.columns, start=1)
    ]
    n = len(names)
    columns = [*names, "origin_id", "idempotency_key"]
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c not in spec.key_columns)
    return (
        f"INSERT INTO {spec.table} AS t ({', '.join(columns)}) "
        f"VALUES ({', '.join(values)}, ${n + 1}, ${n + 2}) "
        f"ON CONFLICT ({', '.join(spec.key_columns)}) DO UPDATE SET {updates}, "
        "synced_at = now() "
        "WHERE t.updated_at < excluded.updated_at"
    )


def naive_arguments(spec: TableSpec, payload: dict[str, Any]) -> list[Any]:
    arguments: list[Any] = []
    for column in spec.columns:
        value = payload.get(column.name)
        if column.kind is Kind.JSONB and value is not None:
            value = json.dumps(value)
        arguments.append(value)
    return arguments


async def naive_relay(dsn: str, workspaces: Sequence[Path], concurrency: int) -> int:
    """Row at a time: per record one PostgreSQL transaction (key insert + entity upsert),
    then one autocommit SQLite UPDATE marking it processed. Returns records relayed."""
    statements = {entity_type: naive_upsert_sql(spec) for entity_type, spec in TABLES.items()}
    queue = list(reversed(workspaces))
    relayed = 0

    async def relay(pg: asyncpg.Connection, workspace: Path) -> None:
        nonlocal relayed
        sqlite = sqlite3.connect(
            database_path(workspace), isolation_level=None, check_same_thread=False
        )
        try:
            sqlite.execute("PRAGMA synchronous = FULL")
            origin = sqlite.execute(
                "SELECT value FROM workspace_meta WHERE key = 'origin_id'"
            ).fetchone()[0]
            pending = sqlite.execute(
                "SELECT outbox_id, idempotency_key, entity_type, entity_id, payload "
                "FROM outbox WHERE state = 'pending' ORDER BY outbox_id"
            ).fetchall()

            def mark(outbox_id: int) -> None:
                sqlite.execute(
                    "UPDATE outbox SET state = 'processed', processed_at = ? WHERE outbox_id = ?",
                    (format_timestamp(utc_now()), outbox_id),
                )

            for outbox_id, key, entity_type, _entity_id, payload in pending:
                spec = TABLES[entity_type]
                digest = hashlib.sha256(payload.encode()).digest()
                row = json.loads(payload)
                arguments = naive_arguments(spec, row)
                async with pg.transaction():
                    await pg.execute(_NAIVE_KEY, row["session_id"], key, digest, origin)
                    await pg.execute(statements[entity_type], *arguments, origin, key)
                await anyio.to_thread.run_sync(mark, outbox_id)
                relayed += 1
        finally:
            sqlite.close()

    async def worker() -> None:
        """One PostgreSQL connection, one workspace after another."""
        pg = await asyncpg.connect(dsn, server_settings={"search_path": "acode"})
        try:
            while queue:
                await relay(pg, queue.pop())
        finally:
            await pg.close()

    async with anyio.create_task_group() as group:
        for _ in range(min(concurrency, len(workspaces))):
            group.start_soon(worker)
    return relayed


# --------------------------------------------------------------------------- the run


@dataclass(frozen=True, slots=True)
class Settings:
    records: int
    workspaces: int
    concurrency: int
    batch: int
    naive_records: int
    directory: Path
    dsn: str
    baselines: bool


@dataclass(slots=True)
class Report:
    lines: list[str] = field(default_factory=list)
    figures: list[tuple[str, str, str]] = field(default_factory=list)
    comparison: list[str] = field(default_factory=list)

    def say(self, line: str) -> None:
        print(line, flush=True)
        self.lines.append(line)


def latency_text(samples_ns: Sequence[int]) -> str:
    if not samples_ns:
        return "no samples"
    ordered = sorted(samples_ns)
    p50, p99 = percentile(ordered, 0.50) / 1e6, percentile(ordered, 0.99) / 1e6
    return f"{p50:.2f} / {p99:.2f} / {ordered[-1] / 1e6:.2f} ms (n={len(ordered)})"


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


async def verify(
    dsn: str, workspaces: Sequence[Path], seeded: SeedResult, agent_session: str, agent_saves: int
) -> str:
    conn = await asyncpg.connect(dsn, server_settings={"search_path": "acode"})
    try:
        keys = int(await conn.fetchval(COUNT_APPLIED_VERSIONS))
        agent_keys = int(
            await conn.fetchval(
                f"{COUNT_APPLIED_VERSIONS} WHERE starts_with(idempotency_key, $1)",
                f"Session:{agent_session}:",
            )
        )
        conflicts = int(await conn.fetchval("SELECT count(*) FROM acode.conflicts"))
        entities = 0
        for table in TABLE_ORDER:
            entities += int(await conn.fetchval(f"SELECT count(*) FROM acode.{table}"))
    finally:
        await conn.close()
    left = sum([await anyio.to_thread.run_sync(not_processed, w) for w in workspaces])
    problems = []
    if keys - agent_keys != seeded.records:
        problems.append(f"{keys - agent_keys} seeded versions applied, not {seeded.records}")
    if agent_keys != agent_saves:
        problems.append(f"{agent_keys} agent versions applied, not {agent_saves}")
    if entities != seeded.entities + 1:
        problems.append(f"{entities} entity rows, not {seeded.entities + 1}")
    if conflicts or left:
        problems.append(f"{conflicts} conflicts, {left} records not processed")
    if problems:
        raise SystemExit("verification FAILED: " + "; ".join(problems))
    return (
        f"verified: PostgreSQL applied {seeded.records:,} seeded versions "
        f"(+ {agent_saves:,} agent saves), {entities:,} entity rows, 0 conflicts, "
        f"0 records left pending"
    )


SERVICE_UNIT: Final = Path(__file__).resolve().parents[2] / "systemd" / "acode-syncd.service"


def run_as_the_unit_does() -> str:
    """Give every thread of this process the CPU priority the systemd unit gives the
    daemon (Nice=, CPUSchedulingPolicy=), so the agent's saves compete with the drain as
    they would with the service. Linux only; says what it did."""
    settings = dict(
        line.split("=", 1)
        for line in SERVICE_UNIT.read_text().splitlines()
        if line.startswith(("Nice=", "CPUSchedulingPolicy="))
    )
    nice, policy = int(settings["Nice"]), settings["CPUSchedulingPolicy"]
    if not sys.platform.startswith("linux"):
        return "the drain at normal priority (not Linux)"
    for thread in os.listdir("/proc/self/task"):
        tid = int(thread)
        if policy == "batch":
            os.sched_setscheduler(tid, os.SCHED_BATCH, os.sched_param(0))
        os.setpriority(os.PRIO_PROCESS, tid, nice)
    return f"the drain at the unit's priority (Nice={nice}, CPUSchedulingPolicy={policy})"


async def run(settings: Settings, report: Report) -> None:
    s = settings
    main_dirs = [s.directory / "sync" / f"ws-{i:04d}" for i in range(s.workspaces)]
    naive_count = min(s.workspaces, s.naive_records)
    naive_dirs = [s.directory / "naive" / f"ws-{i:04d}" for i in range(naive_count)]

    started = time.perf_counter()
    seeded = await anyio.to_thread.run_sync(seed, main_dirs, s.records, 1)
    report.say(
        f"seeded {seeded.records:,} records ({seeded.entities:,} entities, avg payload "
        f"{seeded.payload_bytes / max(1, seeded.records):,.0f} bytes) into {s.workspaces} "
        f"workspaces in {time.perf_counter() - started:.1f} s"
    )
    source = s.directory / "baseline-source.db"
    if s.baselines:
        started = time.perf_counter()
        copied = await anyio.to_thread.run_sync(build_source, main_dirs, source)
        report.say(
            f"copied the {copied:,} records into one SQLite file for the baselines in "
            f"{time.perf_counter() - started:.1f} s"
        )
        started = time.perf_counter()
        naive_seeded = await anyio.to_thread.run_sync(seed, naive_dirs, s.naive_records, 100_000)
        report.say(
            f"seeded {naive_seeded.records:,} other records into {naive_count} workspaces for "
            f"the naive relay in {time.perf_counter() - started:.1f} s"
        )

    target = TimedTarget(PostgresSettings(dsn=s.dsn, pool_max=POOL_MAX))
    sync_settings = SyncSettings(batch_max_records=s.batch)
    try:
        await target.ensure_schema()
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        agent = Agent.start(main_dirs[0])
        try:
            await anyio.to_thread.run_sync(agent.wait_ready)
            lowered = run_as_the_unit_does()  # the agent, started before, is not lowered
            # The seeded records come before the agent's (outbox_id order), and a claim
            # takes the oldest: these batches ship every seeded record of its workspace.
            agent_batches = {main_dirs[0]: math.ceil(seeded.counts[0] / s.batch)}
            backends = await BackendCpu.of(s.dsn)
            load_before, cpu_before = os.getloadavg()[0], own_cpu()
            with backends:  # the pool's backends stay open until target.close()
                drained = await drain_all(
                    target, main_dirs, s.concurrency, sync_settings, agent_batches
                )
            cpu_used = own_cpu() - cpu_before
            load_after = os.getloadavg()[0]
        finally:
            agent_session, agent_saves, agent_samples = await anyio.to_thread.run_sync(agent.finish)
        rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        missed = [
            await anyio.to_thread.run_sync(not_processed, w, n)
            for w, n in zip(main_dirs, seeded.counts, strict=True)
        ]
        if any(missed):
            raise SystemExit(f"the drain left {sum(missed)} seeded records pending")
        report.say(
            f"drained {drained.shipped:,} records ({drained.batches:,} batches, "
            f"{drained.conflicts} conflicts, {drained.failed} failed) in "
            f"{drained.seconds:.2f} s"
        )
        backends_used = backends.seconds
        report.say(
            f"CPU during the drain: this process {cpu_used:.1f} s "
            f"({cpu_used / drained.seconds:.2f} cores), its {len(backends.last)} PostgreSQL "
            f"backends {backends_used:.1f} s ({backends_used / drained.seconds:.2f} cores); "
            f"load average {load_before:.1f} before, {load_after:.1f} after; {lowered}"
        )
        # The agent's last saves came after its workspace was drained: ship them too.
        await WorkspaceSyncer(workspace=main_dirs[0], target=target, settings=sync_settings).drain()
    finally:
        await target.close()
    report.say(await verify(s.dsn, main_dirs, seeded, agent_session, agent_saves))
    engine = Measured("acode drain", drained.shipped, drained.seconds, cpu_used, backends_used)
    report.figures += drain_figures(
        s,
        drained,
        target,
        agent_workspace=main_dirs[0],
        rss=(rss_before, rss_peak),
        agent_samples=agent_samples,
        records=seeded.records,
    )
    if not s.baselines:
        return

    backends = await BackendCpu.of(s.dsn)
    started, cpu_before = time.perf_counter(), own_cpu()
    with backends:
        relayed = await naive_relay(s.dsn, naive_dirs, s.concurrency)
    naive = Measured(
        "naive relay (own sample)",
        relayed,
        time.perf_counter() - started,
        own_cpu() - cpu_before,
        backends.seconds,
    )
    left = sum([await anyio.to_thread.run_sync(not_processed, w) for w in naive_dirs])
    if relayed != naive_seeded.records or left:
        raise SystemExit(f"naive relay FAILED: {relayed} relayed, {left} left pending")
    report.say(
        f"naive relay: {relayed:,} records in {naive.seconds:.2f} s (one PostgreSQL "
        f"transaction + one SQLite UPDATE per record, {min(s.concurrency, naive_count)} "
        "workspaces at once)"
    )
    # The agent's saves again, into a workspace no syncer reads, while the baselines load
    # PostgreSQL on this machine: what a save pays for sharing the disk with the server.
    beside = s.directory / "agent-beside-the-baselines"
    beside.mkdir()
    quiet_agent = Agent.start(beside)
    try:
        await anyio.to_thread.run_sync(quiet_agent.wait_ready)
        pgloader, copy = await run_baselines(source, s.dsn, seeded.records, report.say)
    finally:
        _, _, beside_baselines = await anyio.to_thread.run_sync(quiet_agent.finish)
    ways = [engine, *([pgloader] if pgloader else []), copy, naive]
    report.comparison = comparison(ways, pgloader, copy)
    report.figures += [
        ("naive relay records/s", f"{naive.rate:,.0f} ({relayed:,} records)", ""),
        ("drain / pgloader", *pgloader_ratio(s, engine.rate, pgloader)),
        ("drain / binary COPY", f"{engine.rate / copy.rate:.2f}x", ""),
        (
            "agent save, no syncer, while the baselines load",
            latency_text([d for _, d in beside_baselines]),
            "",
        ),
    ]


def pgloader_ratio(s: Settings, rate: float, pgloader: Measured | None) -> tuple[str, str]:
    """The drain / pgloader figure and its target (1M records in one run)."""
    one = s.workspaces == 1
    wanted = PGLOADER_RATIO_TARGET_ONE if one else PGLOADER_RATIO_TARGET_MANY
    scope = f">= {wanted:g}x (1M records, {'one workspace' if one else '100 workspaces'})"
    if pgloader is None:
        return "n/a", f"{scope}: pgloader not run"
    ratio = rate / pgloader.rate
    return f"{ratio:.2f}x", f"{scope}: {verdict(ratio >= wanted)}"


def drain_figures(
    s: Settings,
    drained: DrainResult,
    target: TimedTarget,
    *,
    agent_workspace: Path,
    rss: tuple[float, float],
    agent_samples: Sequence[tuple[int, int]],
    records: int,
) -> list[tuple[str, str, str]]:
    rss_before, rss_peak = rss
    batch_ns = sorted(target.apply_ns)
    rate = drained.shipped / drained.seconds
    during = [d for start, d in agent_samples if drained.started_ns <= start <= drained.ended_ns]
    own_start, own_end = drained.windows[agent_workspace]
    during_own = [d for start, d in agent_samples if own_start <= start <= own_end]
    during_p99 = percentile(sorted(during), 0.99) / 1e6 if during else float("inf")
    return [
        ("records", f"{records:,}", ""),
        ("workspaces", f"{s.workspaces} (concurrency {s.concurrency})", ""),
        ("records/s", f"{rate:,.0f}", ""),
        (
            "batch apply p50 / p99",
            f"{percentile(batch_ns, 0.5) / 1e6:.1f} / {percentile(batch_ns, 0.99) / 1e6:.1f} ms"
            f" (n={len(batch_ns)}, batch {s.batch})",
            "",
        ),
        (
            "peak RSS",
            f"{rss_peak:.1f} MB (before the drain {rss_before:.1f} MB)",
            f"<= {RSS_TARGET_MB:g} MB: {verdict(rss_peak <= RSS_TARGET_MB)}",
        ),
        (
            "agent save p50 / p99 / max",
            latency_text(during),
            f"p99 <= {AGENT_SAVE_TARGET_MS:g} ms: {verdict(during_p99 <= AGENT_SAVE_TARGET_MS)}",
        ),
        ("  while its own workspace drained", latency_text(during_own), ""),
    ]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.bench_sync",
        description="Time the sync engine draining workspace outboxes into PostgreSQL.",
    )
    parser.add_argument("--records", type=int, default=100_000, help="records to seed")
    parser.add_argument("--workspaces", type=int, default=100, help="workspaces to spread them")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="workspaces drained at once (default: as the daemon, min(workspaces, "
        f"{DAEMON_CONCURRENCY}))",
    )
    parser.add_argument("--batch", type=int, default=1000, help="sync.batch_max_records")
    parser.add_argument(
        "--naive-records",
        type=int,
        default=None,
        help=f"records for the naive relay (default: min(records, {NAIVE_MAX_RECORDS}))",
    )
    parser.add_argument(
        "--no-baselines",
        dest="baselines",
        action="store_false",
        help="drain only: no pgloader, binary COPY or naive relay",
    )
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to create the workspaces (default: temp)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the workspaces and the PostgreSQL database"
    )
    parser.add_argument(
        "--plan-cache-mode",
        choices=PLAN_CACHE_MODES,
        default=None,
        help="diagnostic: set plan_cache_mode on the benchmark's own database "
        "(ALTER DATABASE; the server's settings are left alone)",
    )
    args = parser.parse_args(argv)
    if args.workspaces < 1 or args.records < args.workspaces or args.batch < 1:
        parser.error("need --workspaces >= 1, --records >= --workspaces and --batch >= 1")
    if args.concurrency is None:
        args.concurrency = min(args.workspaces, DAEMON_CONCURRENCY)
    if args.naive_records is None:
        args.naive_records = min(args.records, NAIVE_MAX_RECORDS)
    if args.concurrency < 1 or args.naive_records < 1:
        parser.error("need --concurrency >= 1 and --naive-records >= 1")
    return args


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN_URL)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _server_version() -> str:
    conn = await asyncpg.connect(ADMIN_URL)
    try:
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    tune_interpreter()  # as the daemon does
    report = Report()
    pg_version = anyio.run(_server_version, backend="asyncio")
    report.say(
        f"acode-sync sync benchmark: {args.records:,} records, {args.workspaces} workspaces, "
        f"concurrency {args.concurrency}, batch {args.batch}, pool_max {POOL_MAX}; "
        f"PostgreSQL {pg_version}, SQLite {sqlite3.sqlite_version}, "
        f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs; the engine from "
        f"{Path(acode_sync.__file__).parent}"
    )
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix="acode-bench-sync-", dir=args.dir))
    name = f"acode_bench_{os.getpid()}_{secrets.token_hex(4)}"
    dsn = database_url(name)
    saved_logging = structlog.get_config()
    try:
        configure_logging(level="warning", stream=sys.stderr)
        anyio.run(_admin, f'CREATE DATABASE "{name}"', backend="asyncio")
        report.say(f"workspaces in {directory}, PostgreSQL database {name}")
        if args.plan_cache_mode is not None:
            sql = f'ALTER DATABASE "{name}" SET plan_cache_mode = {args.plan_cache_mode}'
            anyio.run(_admin, sql, backend="asyncio")
            report.say(f"diagnostic: plan_cache_mode = {args.plan_cache_mode} on {name}")
        settings = Settings(
            records=args.records,
            workspaces=args.workspaces,
            concurrency=args.concurrency,
            batch=args.batch,
            naive_records=args.naive_records,
            directory=directory,
            dsn=dsn,
            baselines=args.baselines,
        )
        anyio.run(run, settings, report, backend="asyncio")
    finally:
        structlog.configure(**saved_logging)
        if args.keep:
            print(f"kept {directory} and the database {dsn}")
        else:
            anyio.run(_admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', backend="asyncio")
            shutil.rmtree(directory)
    print()
    width = max(len(label) for label, _, _ in report.figures)
    value_width = max(len(value) for _, value, _ in report.figures)
    print(f"{'figure':<{width}}  {'measured':<{value_width}}  target")
    for label, value, target in report.figures:
        print(f"{label:<{width}}  {value:<{value_width}}  {target}".rstrip())
    if report.comparison:
        print()
        print("\n".join(report.comparison))
    return 0


if __name__ == "__main__":
    sys.exit(main())
