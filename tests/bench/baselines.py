"""The baselines every drain benchmark runs beside the engine, on the same records.

- pgloader (Debian package `pgloader`) loading the outbox table from one SQLite file into
  PostgreSQL, the tool a user would reach for first;
- asyncpg's binary COPY (`copy_records_to_table`) of the same rows, already in memory,
  into a typed table (jsonb payload, primary key, unique key): the ceiling for this shape.

Each is measured as records/s and as CPU per record on both sides: the client (this
process, or pgloader as its child) from getrusage, and the PostgreSQL backends serving the
benchmark's database from /proc/<pid>/stat (see `BackendCpu`).
"""

from __future__ import annotations

import os
import resource
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import anyio
import anyio.to_thread
import asyncpg

from acode_sync.workspace import database_path

# pgloader's defaults (prefetch rows = 100000) die with "Heap exhausted" on 1M rows of
# ~1 KB: it holds that many rows per reader and writer in its Lisp heap.
PGLOADER_PREFETCH_ROWS: Final = 10_000
BACKEND_SAMPLE_SECONDS: Final = 0.05
COPY_CONNECTIONS: Final = 2  # the ceiling on 2 cores: 4 add nothing
COPY_SCHEMA: Final = "baseline_copy"
PGLOADER_TABLE: Final = "public.outbox_records"
OUTBOX_TABLE: Final = "outbox_records"
CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")

_COPY_DDL: Final = f"""
CREATE SCHEMA {COPY_SCHEMA};
CREATE TABLE {COPY_SCHEMA}.outbox (
    outbox_id bigint PRIMARY KEY,
    idempotency_key text NOT NULL UNIQUE,
    entity_type text NOT NULL,
    entity_id text NOT NULL,
    session_id text,
    payload jsonb NOT NULL,
    base_updated_at timestamptz,
    created_at timestamptz NOT NULL,
    updated_at timestamptz
);
"""
_COPY_COLUMNS: Final = (
    "outbox_id",
    "idempotency_key",
    "entity_type",
    "entity_id",
    "session_id",
    "payload",
    "base_updated_at",
    "created_at",
    "updated_at",
)


@dataclass(frozen=True, slots=True)
class Measured:
    """One way of moving the records: its wall time and the CPU it cost on each side."""

    name: str
    records: int
    seconds: float
    client_cpu: float
    server_cpu: float

    @property
    def rate(self) -> float:
        return self.records / self.seconds

    def cpu_per_record_us(self) -> tuple[float, float]:
        return (1e6 * self.client_cpu / self.records, 1e6 * self.server_cpu / self.records)


# --------------------------------------------------------------------------- CPU


def stat_fields(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name (state is [0])."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_of(pid: int) -> float:
    """utime + stime of a live process, in seconds."""
    fields = stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def children_cpu() -> float:
    """CPU of the children this process has waited for (pgloader, once it has exited)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class BackendCpu:
    """CPU spent by a local PostgreSQL's backends serving one database, from /proc.

    A thread samples the postmaster's children every BACKEND_SAMPLE_SECONDS and keeps,
    per backend whose process title names the database, its CPU at the first and the
    last sample; a backend born during the measurement counts from zero. Backends of
    other databases (other users of a shared server) and the server's own processes (WAL
    writer, checkpointer, autovacuum) are left out. A backend that exits during the
    measurement (pgloader closes its connections) loses at most one sampling interval.
    """

    def __init__(self, postmaster: int, database: str) -> None:
        self.postmaster = postmaster
        self.title = f" {database} "
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.ours: set[int] = set()
        self.counting_from_now = True
        self.excluded: set[int] = set()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="backend-cpu", daemon=True)

    @classmethod
    async def of(cls, dsn: str) -> BackendCpu:
        conn = await asyncpg.connect(dsn)
        try:
            backend = int(await conn.fetchval("SELECT pg_backend_pid()"))
            database = str(await conn.fetchval("SELECT current_database()"))
            postmaster = int(stat_fields(backend)[1])  # while the backend lives
        finally:
            await conn.close()
        return cls(postmaster, database)

    def _ours(self, pid: int) -> bool:
        """Whether the backend serves our database. Only a yes is remembered: a backend
        still starting up has a title without its database yet."""
        if pid not in self.ours:
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                return False
            if self.title.encode() not in title:
                return False
            self.ours.add(pid)
        return True

    def _children(self) -> list[int]:
        listing = Path(f"/proc/{self.postmaster}/task/{self.postmaster}/children")
        return [int(pid) for pid in listing.read_text().split()]

    def sample(self) -> None:
        for pid in self._children():
            if pid in self.excluded or not self._ours(pid):
                continue
            try:
                used = cpu_of(pid)
            except (OSError, IndexError):
                continue  # it exited between the listing and the read
            self.first.setdefault(pid, used if self.counting_from_now else 0.0)
            self.last[pid] = used
        self.counting_from_now = False

    def _loop(self) -> None:
        while not self.stopping.wait(BACKEND_SAMPLE_SECONDS):
            self.sample()

    def __enter__(self) -> BackendCpu:
        self.sample()  # the backends already there count from their CPU now
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join()
        self.sample()

    def exclude(self, pid: int) -> None:
        """Leave out a backend of the benchmark's own (its poll), all along."""
        self.excluded.add(pid)

    @property
    def seconds(self) -> float:
        return sum(
            self.last[pid] - self.first[pid] for pid in self.last if pid not in self.excluded
        )


# --------------------------------------------------------------------------- the source


def build_source(workspaces: Sequence[Path], target: Path) -> int:
    """One SQLite file with every workspace's outbox table (its DDL and indexes, the
    records renumbered in workspace then outbox_id order): what pgloader and COPY load.
    Returns the records copied."""
    first = sqlite3.connect(database_path(workspaces[0]))
    try:
        ddl = [
            str(row[0])
            for row in first.execute(
                "SELECT sql FROM sqlite_master WHERE tbl_name = ? AND type IN "
                "('table', 'index') AND sql IS NOT NULL ORDER BY type DESC",
                (OUTBOX_TABLE,),
            )
        ]
        columns = [str(row[1]) for row in first.execute(f"PRAGMA table_info({OUTBOX_TABLE})")]
    finally:
        first.close()
    copied = ", ".join(column for column in columns if column != "outbox_id")
    conn = sqlite3.connect(target, isolation_level=None)
    try:
        for statement in ddl:
            conn.execute(statement)
        for workspace in workspaces:
            conn.execute("ATTACH DATABASE ? AS ws", (str(database_path(workspace)),))
            conn.execute("BEGIN")
            conn.execute(
                f"INSERT INTO {OUTBOX_TABLE} ({copied}) "
                f"SELECT {copied} FROM ws.{OUTBOX_TABLE} ORDER BY outbox_id"
            )
            conn.execute("COMMIT")
            conn.execute("DETACH DATABASE ws")
        return int(conn.execute(f"SELECT count(*) FROM {OUTBOX_TABLE}").fetchone()[0])
    finally:
        conn.close()


# --------------------------------------------------------------------------- pgloader


def pgloader_path() -> str | None:
    return shutil.which("pgloader")


def pgloader_command_file(source: Path, dsn: str) -> str:
    """The load command: the outbox table alone, into the database's public schema. The
    password, if any, goes through PGPASSWORD, never into the file."""
    url = urlsplit(dsn)
    user = unquote(url.username or "postgres")
    host = url.hostname or "127.0.0.1"
    target = f"postgresql://{user}@{host}:{url.port or 5432}{url.path}"
    return (
        "LOAD DATABASE\n"
        f"    FROM sqlite://{source}\n"
        f"    INTO {target}\n"
        "WITH include drop, create tables, create indexes, reset sequences,\n"
        f"     prefetch rows = {PGLOADER_PREFETCH_ROWS}\n"
        f"INCLUDING ONLY TABLE NAMES LIKE '{OUTBOX_TABLE}';\n"
    )


async def run_pgloader(executable: str, source: Path, dsn: str, records: int) -> Measured:
    """pgloader loading the outbox table of `source`; fails unless every record arrived."""
    backends = await BackendCpu.of(dsn)
    password = urlsplit(dsn).password
    env = {**os.environ, **({"PGPASSWORD": unquote(password)} if password else {})}
    with tempfile.TemporaryDirectory(prefix="acode-bench-pgloader-") as workdir:
        commands = Path(workdir) / "load.pgl"
        commands.write_text(pgloader_command_file(source, dsn))
        command = [executable, "--quiet", "--root-dir", workdir, str(commands)]
        children_before = children_cpu()
        started = time.perf_counter()
        with backends:
            done = await anyio.run_process(command, env=env, check=False)
        seconds = time.perf_counter() - started
        client = children_cpu() - children_before
    loaded = await _count(dsn, f"SELECT count(*) FROM {PGLOADER_TABLE}", done.returncode == 0)
    if loaded != records:
        tail = (done.stdout + done.stderr).decode(errors="replace").splitlines()[-20:]
        raise SystemExit(
            f"pgloader FAILED (exit {done.returncode}, {loaded} of {records:,} rows loaded):\n"
            + "\n".join(tail)
        )
    return Measured("pgloader", records, seconds, client, backends.seconds)


async def _count(dsn: str, sql: str, expect_table: bool) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(sql))
    except asyncpg.UndefinedTableError:
        if expect_table:
            raise
        return 0
    finally:
        await conn.close()


# --------------------------------------------------------------------------- binary COPY


def _timestamp(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def read_rows(source: Path) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(source)
    try:
        rows = conn.execute(
            f"SELECT {', '.join(_COPY_COLUMNS)} FROM {OUTBOX_TABLE} ORDER BY outbox_id"
        ).fetchall()
    finally:
        conn.close()
    return [(*row[:6], _timestamp(row[6]), _timestamp(row[7]), _timestamp(row[8])) for row in rows]


async def run_copy(source: Path, dsn: str, connections: int = COPY_CONNECTIONS) -> Measured:
    """Binary COPY of the outbox rows, read into memory first (not timed), split into
    `connections` contiguous parts copied at once into a typed table."""
    rows = await anyio.to_thread.run_sync(read_rows, source)
    backends = await BackendCpu.of(dsn)
    conns = [await asyncpg.connect(dsn) for _ in range(connections)]
    try:
        await conns[0].execute(_COPY_DDL)
        share = -(-len(rows) // connections)
        parts = [rows[i * share : (i + 1) * share] for i in range(connections)]

        async def copy(conn: asyncpg.Connection, part: list[tuple[Any, ...]]) -> None:
            await conn.copy_records_to_table(
                "outbox", schema_name=COPY_SCHEMA, columns=_COPY_COLUMNS, records=part
            )

        client_before = own_cpu()
        started = time.perf_counter()
        with backends:
            async with anyio.create_task_group() as group:
                for conn, part in zip(conns, parts, strict=True):
                    group.start_soon(copy, conn, part)
            backends.sample()  # before the connections close
        seconds = time.perf_counter() - started
        client = own_cpu() - client_before
        copied = int(await conns[0].fetchval(f"SELECT count(*) FROM {COPY_SCHEMA}.outbox"))
    finally:
        for conn in conns:
            await conn.close()
    if copied != len(rows):
        raise SystemExit(f"binary COPY FAILED: {copied} of {len(rows):,} rows in the table")
    name = f"binary COPY ({connections} connection{'s' if connections > 1 else ''})"
    return Measured(name, len(rows), seconds, client, backends.seconds)


# --------------------------------------------------------------------------- the report


def ratio(value: float, base: Measured | None) -> str:
    return "n/a" if base is None else f"{value / base.rate:.2f}x"


def comparison(
    measured: Sequence[Measured], pgloader: Measured | None, copy: Measured | None
) -> list[str]:
    """One line per way: records/s, the ratios to pgloader and to COPY, CPU per record."""
    width = max(len(m.name) for m in measured)
    lines = [
        f"{'same records, same run':<{width}}  {'records/s':>10}  {'/pgloader':>9}  "
        f"{'/COPY':>6}  CPU per record: client / PostgreSQL backends"
    ]
    for m in measured:
        client, server = m.cpu_per_record_us()
        lines.append(
            f"{m.name:<{width}}  {m.rate:>10,.0f}  {ratio(m.rate, pgloader):>9}  "
            f"{ratio(m.rate, copy):>6}  {client:.1f} / {server:.1f} µs"
        )
    return lines


async def run_baselines(
    source: Path, dsn: str, records: int, say: Any
) -> tuple[Measured | None, Measured]:
    """pgloader (skipped, with a line saying so, where it is not installed), then COPY."""
    executable = pgloader_path()
    pgloader = None
    if executable is None:
        say("pgloader: not installed (Debian package pgloader), skipped")
    else:
        pgloader = await run_pgloader(executable, source, dsn, records)
        say(
            f"pgloader: {records:,} records in {pgloader.seconds:.2f} s "
            f"(prefetch rows = {PGLOADER_PREFETCH_ROWS:,})"
        )
    copy = await run_copy(source, dsn)
    say(f"{copy.name}: {copy.records:,} records in {copy.seconds:.2f} s")
    return pgloader, copy
