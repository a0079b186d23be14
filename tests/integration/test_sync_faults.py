"""The sync engine under faults: killed syncers, a broken network, poison records, secrets.

Every test checks the end state against an audit trail kept by PostgreSQL itself (AFTER
INSERT OR UPDATE triggers on every entity table), so "applied exactly once" means no
entity write happened twice, not merely that applied_keys, which is unique, holds a key.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote, urlsplit, urlunsplit

import anyio
import anyio.to_thread
import asyncpg
import pytest

from acode_sync.config import PostgresSettings, SyncSettings, load_config
from acode_sync.domain import (
    Session,
    SessionTask,
    format_timestamp,
    new_id,
    parse_timestamp,
)
from acode_sync.errors import PostgresUnavailableError
from acode_sync.outbox import replay
from acode_sync.pg_tables import TABLES
from acode_sync.postgres import PostgresTarget
from acode_sync.retry import RecordRetryPolicy
from acode_sync.store import WorkspaceDatabase
from acode_sync.sync import SyncSummary, WorkspaceSyncer
from acode_sync.workspace import database_path
from tests.faults import AtNth
from tests.integration.sync_child import NOT_REACHED
from tests.pg import ADMIN_URL, APPLIED_VERSION_KEYS, AUDIT_TABLE, install_audit
from tests.proxy import TcpProxy
from tests.records import enqueue_raw, session_payload

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

ROOT: Final = Path(__file__).resolve().parents[2]
BATCH: Final = 10
CHILD_TIMEOUT: Final = 60.0

# -- PostgreSQL helpers ----------------------------------------------------------------


def make_target(
    dsn: str, *, connect_timeout: float = 2, statement_timeout: float = 5
) -> PostgresTarget:
    return PostgresTarget(
        PostgresSettings(
            dsn=dsn, connect_timeout=connect_timeout, statement_timeout=statement_timeout
        )
    )


async def pg_fetch(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def pg_execute(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def audit_counts(dsn: str) -> Counter[str]:
    rows = await pg_fetch(dsn, f"SELECT idempotency_key FROM {AUDIT_TABLE}")
    return Counter(str(row[0]) for row in rows)


async def applied_key_counts(dsn: str) -> Counter[str]:
    """The keys of the versions PostgreSQL applied, each as often as it holds it."""
    rows = await pg_fetch(dsn, APPLIED_VERSION_KEYS)
    return Counter(str(row[0]) for row in rows)


async def held_versions(dsn: str) -> dict[tuple[str, str], str]:
    """(entity type, id) -> the idempotency key of the version each entity row holds."""
    held = {}
    for entity_type, spec in TABLES.items():
        rows = await pg_fetch(
            dsn, f"SELECT {spec.id_column}, idempotency_key FROM acode.{spec.table}"
        )
        held.update({(entity_type, str(r[0])): str(r[1]) for r in rows})
    return held


async def ready_target(dsn: str) -> None:
    """Create the acode schema (as the syncer would) and the audit triggers."""
    target = make_target(dsn)
    try:
        await target.ensure_schema()
    finally:
        await target.close()
    await install_audit(dsn)


# -- SQLite helpers --------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    outbox_id: int
    idempotency_key: str
    entity_type: str
    entity_id: str
    state: str
    attempts: int
    next_attempt_at: str | None
    last_error: str | None


@contextmanager
def sqlite(workspace: Path) -> Iterator[sqlite3.Connection]:
    with closing(
        sqlite3.connect(database_path(workspace), isolation_level=None, timeout=10.0)
    ) as conn:
        yield conn


def outbox(workspace: Path) -> dict[int, Row]:
    with sqlite(workspace) as conn:
        rows = conn.execute(
            "SELECT outbox_id, idempotency_key, entity_type, entity_id, state, attempts,"
            " next_attempt_at, last_error FROM outbox ORDER BY outbox_id"
        ).fetchall()
    return {row[0]: Row(*row) for row in rows}


def error_counts(workspace: Path) -> Counter[int]:
    with sqlite(workspace) as conn:
        rows = conn.execute("SELECT outbox_id FROM outbox_errors").fetchall()
    return Counter(int(row[0]) for row in rows)


def error_attempts(workspace: Path, outbox_id: int) -> list[int]:
    with sqlite(workspace) as conn:
        rows = conn.execute(
            "SELECT attempt FROM outbox_errors WHERE outbox_id = ? ORDER BY error_id",
            (outbox_id,),
        ).fetchall()
    return [int(row[0]) for row in rows]


def insert_raw(
    workspace: Path, entity_type: str, entity_id: str, session_id: str, stamp: str, payload: str
) -> int:
    """Enqueue a record the way any sqlite3 writer may: the six contract columns."""
    with sqlite(workspace) as conn:
        key = f"{entity_type}:{entity_id}:{stamp}"
        return enqueue_raw(conn, key, entity_type, entity_id, session_id, payload, stamp)


def write_records(workspace: Path, count: int = 50) -> list[str]:
    """`count` saves: sessions, their updates, tasks and task updates, interleaved so that
    most batches carry several versions of one entity. Returns the keys in outbox order."""
    db = WorkspaceDatabase(workspace)
    try:
        sessions = [db.save(Session(title=f"session {i}")) for i in range(7)]
        tasks: list[SessionTask] = []
        for step in range(count - len(sessions)):
            index = step * 3 % len(sessions)
            if step % 3 == 0:
                sessions[index] = db.save(replace(sessions[index], title=f"renamed {step}"))
            elif step % 3 == 1:
                task = SessionTask(session_id=sessions[index].session_id, title=f"task {step}")
                tasks.append(db.save(task))
            else:
                tasks[-1] = db.save(replace(tasks[-1], status=f"status {step}"))
    finally:
        db.close()
    keys = [row.idempotency_key for row in outbox(workspace).values()]
    assert len(keys) == count
    return keys


def states(workspace: Path) -> Counter[str]:
    return Counter(row.state for row in outbox(workspace).values())


def assert_untouched(workspace: Path, pending_ids: set[int]) -> None:
    """Records an outage interrupted: still pending, no attempt used up, no error row."""
    rows = outbox(workspace)
    assert {i for i, r in rows.items() if r.state == "pending"} == pending_ids
    for outbox_id in pending_ids:
        row = rows[outbox_id]
        assert (row.attempts, row.next_attempt_at, row.last_error) == (0, None, None), row
    assert not error_counts(workspace)


async def assert_applied_exactly_once(dsn: str, workspace: Path) -> None:
    """Every record processed; PostgreSQL applied every key once, no other, and every
    entity row holds its newest version."""
    rows = outbox(workspace)
    assert {r.state for r in rows.values()} == {"processed"}, states(workspace)
    keys = Counter(r.idempotency_key for r in rows.values())
    assert await applied_key_counts(dsn) == keys
    assert await audit_counts(dsn) == keys  # no entity write happened twice
    newest = {(r.entity_type, r.entity_id): r.idempotency_key for r in rows.values()}
    assert await held_versions(dsn) == newest


def syncer(
    workspace: Path,
    target: PostgresTarget,
    *,
    fault_hook: Callable[[str], None] | None = None,
    **settings: Any,
) -> WorkspaceSyncer:
    return WorkspaceSyncer(
        workspace=workspace,
        target=target,
        settings=SyncSettings(batch_max_records=BATCH, **settings),
        fault_hook=fault_hook,
    )


def counts(summary: SyncSummary) -> tuple[int, int, int, int, int, int]:
    """(applied, duplicates, conflicts, retried, dead, batches)."""
    s = summary
    return (s.applied, s.duplicates, s.conflicts, s.retried, s.dead, s.batches)


def python_path() -> str:
    """The repository root first, so that `-m tests.integration.sync_child` resolves."""
    inherited = os.environ.get("PYTHONPATH")
    return os.pathsep.join([str(ROOT), inherited] if inherited else [str(ROOT)])


def ids_after(workspace: Path, last: int) -> set[int]:
    return {i for i in outbox(workspace) if i > last}


# -- a syncer killed at each point of the commit protocol -----------------------

KILLED_BATCH: Final = 3  # two batches complete before the kill, so it is mid-drain


@pytest.mark.processes
@pytest.mark.parametrize("point", ["before_commit", "after_commit", "after_mark"])
async def test_a_syncer_killed_mid_drain_loses_and_duplicates_nothing(
    workspace: Path, pg_url: str, point: str
) -> None:
    keys = write_records(workspace, 50)
    await ready_target(pg_url)

    child = await anyio.to_thread.run_sync(
        lambda: subprocess.run(
            [
                sys.executable,
                "-m",
                "tests.integration.sync_child",
                str(workspace),
                pg_url,
                point,
                str(KILLED_BATCH),
                str(BATCH),
            ],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": python_path()},
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT,
            check=False,
        )
    )
    # NOT_REACHED would mean the drain ended before the fault point.
    assert child.returncode == -signal.SIGKILL, (child.returncode, NOT_REACHED, child.stderr)

    # Where the kill left things: the killed batch is committed in PostgreSQL from
    # after_commit on, and marked in SQLite only at after_mark. While a batch is marked,
    # the next one is already being applied: at after_mark it may have committed too,
    # and before it the batch before may not be marked yet.
    done = BATCH * (KILLED_BATCH - 1)
    committed = done if point == "before_commit" else done + BATCH
    marked = done + BATCH if point == "after_mark" else done
    if point == "after_mark" and len(await applied_key_counts(pg_url)) > committed:
        committed += BATCH
    processed = {i for i, r in outbox(workspace).items() if r.state == "processed"}
    if point != "after_mark" and len(processed) == marked - BATCH:
        marked -= BATCH
    assert processed == set(range(1, marked + 1))
    assert_untouched(workspace, set(range(marked + 1, len(keys) + 1)))
    assert await applied_key_counts(pg_url) == Counter(keys[:committed])
    assert await audit_counts(pg_url) == Counter(keys[:committed])

    target = make_target(pg_url)
    try:
        summary = await syncer(workspace, target).drain()
    finally:
        await target.close()

    resent = committed - marked  # committed but never marked: the crash window
    assert summary.duplicates == resent
    assert summary.applied == len(keys) - committed
    assert (summary.conflicts, summary.retried, summary.dead) == (0, 0, 0)
    if point == "after_commit":
        assert summary.duplicates > 0  # the window between COMMIT and the mark was hit
    await assert_applied_exactly_once(pg_url, workspace)


# -- the network fails under the syncer -----------------------------------------


@pytest.fixture
def proxy(pg_url: str) -> Iterator[TcpProxy]:
    parts = urlsplit(pg_url)
    with TcpProxy(upstream=(parts.hostname or "127.0.0.1", parts.port or 5432)) as running:
        yield running


async def test_postgres_down_at_the_start_leaves_every_record_pending(
    workspace: Path, pg_url: str, proxy: TcpProxy
) -> None:
    keys = write_records(workspace, 20)
    await ready_target(pg_url)
    target = make_target(proxy.dsn(pg_url))
    try:
        await target.ensure_schema()  # the pool now holds a live connection
        proxy.down()
        with pytest.raises(PostgresUnavailableError) as raised:
            await syncer(workspace, target).drain()
        assert raised.value.code == "ACODE-DB-005"
        assert proxy.accepted >= 2  # the schema check, then a refused attempt
        assert_untouched(workspace, set(outbox(workspace)))

        # The agent keeps saving while PostgreSQL is away.
        db = WorkspaceDatabase(workspace)
        try:
            more = [db.save(Session(title=f"offline {i}")) for i in range(3)]
        finally:
            db.close()
        with pytest.raises(PostgresUnavailableError):
            await syncer(workspace, target).drain()
        assert_untouched(workspace, set(outbox(workspace)))
        assert await applied_key_counts(pg_url) == Counter()

        proxy.restore()
        summary = await syncer(workspace, target).drain()
    finally:
        await target.close()
    assert summary.applied == len(keys) + len(more)
    assert summary.duplicates == 0
    await assert_applied_exactly_once(pg_url, workspace)


@pytest.mark.parametrize("fault", ["cut", "down"])
async def test_a_cut_mid_drain_rolls_the_batch_back_and_loses_nothing(
    workspace: Path, pg_url: str, proxy: TcpProxy, fault: str
) -> None:
    keys = write_records(workspace, 50)
    await ready_target(pg_url)
    # "cut": a blip, every live connection reset; "down": and new ones refused until
    # restore().
    cut_at_the_second_commit = AtNth("before_commit", 2, getattr(proxy, fault))

    target = make_target(proxy.dsn(pg_url))
    try:
        with pytest.raises(PostgresUnavailableError):
            await syncer(workspace, target, fault_hook=cut_at_the_second_commit).drain()
        assert cut_at_the_second_commit.seen == 2
        # Batch 1 went through; batch 2 died with its connection before COMMIT.
        assert_untouched(workspace, ids_after(workspace, BATCH))
        assert await applied_key_counts(pg_url) == Counter(keys[:BATCH])
        assert await audit_counts(pg_url) == Counter(keys[:BATCH])

        proxy.restore()
        # The same target (as a long-running daemon would reuse it) recovers.
        summary = await syncer(workspace, target).drain()
    finally:
        await target.close()
    assert (summary.applied, summary.duplicates) == (len(keys) - BATCH, 0)
    await assert_applied_exactly_once(pg_url, workspace)


@pytest.mark.parametrize("when", ["at_connect", "before_commit"])
async def test_a_blackhole_times_out_as_an_outage_then_recovers(
    workspace: Path, pg_url: str, proxy: TcpProxy, when: str
) -> None:
    keys = write_records(workspace, 30)
    await ready_target(pg_url)
    # The COMMIT goes out and nothing ever answers.
    blackhole_at_the_second_commit = AtNth("before_commit", 2, proxy.blackhole)
    hook = blackhole_at_the_second_commit if when == "before_commit" else None
    # A fresh target: at_connect, its very first connection goes into the blackhole.
    target = make_target(proxy.dsn(pg_url), connect_timeout=1.5, statement_timeout=1)
    try:
        if when == "at_connect":
            proxy.blackhole()
        started = time.monotonic()
        with pytest.raises(PostgresUnavailableError) as raised:
            await syncer(workspace, target, fault_hook=hook).drain()
        elapsed = time.monotonic() - started
        assert raised.value.code == "ACODE-DB-005"
        assert elapsed < 30, elapsed
        assert "TimeoutError" in raised.value.message  # a silent peer, not a refusal
        done = BATCH if when == "before_commit" else 0
        assert_untouched(workspace, ids_after(workspace, done))

        proxy.restore()
        summary = await syncer(workspace, target).drain()
    finally:
        await target.close()
    # A COMMIT held by the blackhole may reach PostgreSQL once it clears: then the
    # batch comes back as duplicates, never as a second write.
    assert summary.applied + summary.duplicates == len(keys) - done
    assert summary.duplicates in (0, BATCH)
    await assert_applied_exactly_once(pg_url, workspace)


# -- AC-039..041, X-004: poison records ------------------------------------------------


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance_past(self, stamp: str) -> None:
        self.now = max(self.now, parse_timestamp(stamp) + timedelta(seconds=1))


MAX_PAYLOAD: Final = 2048
BASE_DELAY: Final = 5.0
CAP: Final = 3600.0
MAX_ATTEMPTS: Final = 10


def check_backoff(row: Row, attempt: int, now: datetime, reason: str) -> None:
    """After its `attempt`-th failure: pending until 5 s * 2^(attempt-1), capped, plus at
    most 10% jitter; dead after the 10th, with no next attempt."""
    assert row.attempts == attempt, row
    assert row.last_error is not None
    assert reason in row.last_error, row
    if attempt < MAX_ATTEMPTS:
        assert row.state == "pending", row
        assert row.next_attempt_at is not None
        delay = (parse_timestamp(row.next_attempt_at) - now).total_seconds()
        exact = min(CAP, BASE_DELAY * 2 ** (attempt - 1))
        assert exact - 1e-3 <= delay <= min(CAP, exact * 1.1) + 1e-3, (row, delay)
    else:
        assert (row.state, row.next_attempt_at) == ("dead", None), row


async def test_poison_records_back_off_die_and_replay_without_holding_others(
    workspace: Path, pg_url: str
) -> None:
    await ready_target(pg_url)
    db = WorkspaceDatabase(workspace)
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    t0, t1 = format_timestamp(base), format_timestamp(base + timedelta(seconds=1))
    poison: dict[str, int] = {}
    ids = {sid: new_id("sess") for sid in ("nul", "json", "big", "nope")}
    try:
        good: list[Session | SessionTask] = [db.save(Session(title="good before"))]
        poison["nul"] = insert_raw(
            workspace,
            "Session",
            ids["nul"],
            ids["nul"],
            t0,
            json.dumps(session_payload(ids["nul"], t0, title="a\x00b")),  # "a\u0000b"
        )
        good.append(db.save(SessionTask(session_id=good[0].session_id, title="good task")))
        poison["json"] = insert_raw(
            workspace, "Session", ids["json"], ids["json"], t0, '{"session_id": "sess_'
        )
        poison["type"] = insert_raw(
            workspace, "Widget", "wid_1", good[0].session_id, t0, json.dumps({"w": 1})
        )
        poison["big"] = insert_raw(
            workspace,
            "Session",
            ids["big"],
            ids["big"],
            t0,
            json.dumps(session_payload(ids["big"], t0, title="x" * MAX_PAYLOAD)),
        )
        poison["nope"] = insert_raw(
            workspace,
            "Session",
            ids["nope"],
            ids["nope"],
            t0,
            json.dumps(session_payload(ids["nope"], t0, state="NOPE")),
        )
        # Later, valid versions of two poisoned entities: one refused by PostgreSQL
        # (isolated by bisection), one refused before shipping (over the size limit).
        later = {
            name: insert_raw(
                workspace,
                "Session",
                ids[name],
                ids[name],
                t1,
                json.dumps(session_payload(ids[name], t1, title=f"later {name}")),
            )
            for name in ("nul", "big")
        }
        good.append(db.save(Session(title="good after")))
    finally:
        db.close()
    reasons = {
        "nul": "22P05",  # jsonb refuses \u0000: untranslatable character
        "json": "22P02",  # invalid input syntax for type json
        "type": "unknown entity type",
        "big": "max_payload_bytes",
        "nope": "23514",  # the state CHECK constraint
    }

    poisoned = set(poison.values())
    waiting_behind = set(later.values())
    applied_per_drain = {1: len(good), 4: 1, MAX_ATTEMPTS: len(later)}

    clock = Clock(datetime.now(UTC).replace(microsecond=0))
    target = make_target(pg_url)
    try:
        sync = WorkspaceSyncer(
            workspace=workspace,
            target=target,
            settings=SyncSettings(max_payload_bytes=MAX_PAYLOAD),
            clock=clock,
            policy=RecordRetryPolicy(
                base_seconds=BASE_DELAY,
                cap_seconds=CAP,
                max_attempts=MAX_ATTEMPTS,
                rng=random.Random(0),
            ),
        )
        meanwhile = 0
        for attempt in range(1, MAX_ATTEMPTS + 1):
            summary = await sync.drain()
            rows = outbox(workspace)
            for name, outbox_id in poison.items():
                check_backoff(rows[outbox_id], attempt, clock(), reasons[name])
            assert error_counts(workspace) == Counter(dict.fromkeys(poisoned, attempt))
            assert summary.applied == applied_per_drain.get(attempt, 0), (attempt, summary)
            if attempt == 1:
                # The good records around the poison committed on the first drain.
                good_ids = set(rows) - poisoned - waiting_behind
                assert {rows[i].state for i in good_ids} == {"processed"}
                assert set(await applied_key_counts(pg_url)) == {
                    rows[i].idempotency_key for i in good_ids
                }
            if attempt == 4:
                assert rows[meanwhile].state == "processed"
            if attempt < MAX_ATTEMPTS:
                assert (summary.retried, summary.dead) == (len(poison), 0)
                # Order within an entity: the later versions wait behind their poison.
                assert {(rows[i].state, rows[i].attempts) for i in waiting_behind} == {
                    ("pending", 0)
                }
                # Nothing is retried before its time.
                assert counts(await sync.drain()) == (0, 0, 0, 0, 0, 0)
                assert outbox(workspace) == rows
                clock.advance_past(max(str(rows[i].next_attempt_at) for i in poisoned))
            else:
                assert (summary.retried, summary.dead) == (0, len(poison))
                # Their poison is dead: the later versions went through in that drain.
                assert {rows[i].state for i in waiting_behind} == {"processed"}
            if attempt == 3:
                # A record of another entity is never held back by the retrying poison.
                db = WorkspaceDatabase(workspace)
                try:
                    db.save(Session(title="saved meanwhile"))
                finally:
                    db.close()
                meanwhile = max(outbox(workspace))
        for outbox_id in poison.values():
            assert error_attempts(workspace, outbox_id) == list(range(1, MAX_ATTEMPTS + 1))
        held = await held_versions(pg_url)
        assert held[("Session", ids["nul"])] == f"Session:{ids['nul']}:{t1}"
        assert held[("Session", ids["big"])] == f"Session:{ids['big']}:{t1}"

        # Replay two dead records after fixing their payloads.
        with sqlite(workspace) as conn:
            for name in ("nul", "json"):
                conn.execute(
                    "UPDATE outbox SET payload = ? WHERE outbox_id = ?",
                    (
                        json.dumps(session_payload(ids[name], t0, title=f"fixed {name}")),
                        poison[name],
                    ),
                )
            assert replay(conn, [poison["nul"], poison["json"]]) == 2
        rows = outbox(workspace)
        for name in ("nul", "json"):
            row = rows[poison[name]]
            assert (row.state, row.attempts, row.next_attempt_at) == ("pending", 0, None)
        assert error_counts(workspace)[poison["nul"]] == MAX_ATTEMPTS  # history kept
        summary = await sync.drain()
    finally:
        await target.close()

    assert (summary.applied, summary.conflicts, summary.retried) == (1, 1, 0)
    rows = outbox(workspace)
    assert rows[poison["nul"]].state == rows[poison["json"]].state == "processed"
    assert {rows[poison[n]].state for n in ("type", "big", "nope")} == {"dead"}
    assert error_counts(workspace) == Counter(dict.fromkeys(poison.values(), MAX_ATTEMPTS))
    held = await held_versions(pg_url)
    # The fixed record of a fresh entity was applied...
    assert held[("Session", ids["json"])] == rows[poison["json"]].idempotency_key
    # ...the one older than PostgreSQL's version became a conflict and overwrote nothing.
    assert held[("Session", ids["nul"])] == f"Session:{ids['nul']}:{t1}"
    titles = await pg_fetch(
        pg_url, "SELECT title FROM acode.sessions WHERE session_id = $1", ids["nul"]
    )
    assert [r[0] for r in titles] == ["later nul"]
    conflicts = await pg_fetch(
        pg_url, "SELECT incoming_key, current_key, winner FROM acode.conflicts"
    )
    assert [tuple(c) for c in conflicts] == [
        (rows[poison["nul"]].idempotency_key, f"Session:{ids['nul']}:{t1}", "current")
    ]
    audit = await audit_counts(pg_url)
    assert set(audit.values()) == {1}  # no key was ever applied twice
    assert rows[poison["nul"]].idempotency_key not in audit
    assert rows[poison["json"]].idempotency_key in audit
    for name in ("type", "big", "nope"):
        assert rows[poison[name]].idempotency_key not in audit


# -- AC-058: the password never shows -------------------------------------------------


def dead_port() -> socket.socket:
    """A bound socket that never listens: connections to its port are refused, and no
    other process can take the port meanwhile."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def with_credentials(url: str, user: str, password: str, *, in_query: bool) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    if in_query:
        return urlunsplit(
            parts._replace(netloc=f"{user}@{host}", query=f"password={quote(password)}")
        )
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password)}@{host}"))


def with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    userinfo, at, _ = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{userinfo}{at}127.0.0.1:{port}"))


def run_cli(workspace: Path, url: str, config_home: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACODE_")}
    env.update({"ACODE_POSTGRES_URL": url, "XDG_CONFIG_HOME": str(config_home)})
    return subprocess.run(
        [str(Path(sys.executable).parent / "acode"), "db", "sync", "--workspace", str(workspace)],
        env=env,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
        check=False,
    )


async def role_exists(role: str) -> bool:
    rows = await pg_fetch(ADMIN_URL, "SELECT 1 FROM pg_roles WHERE rolname = $1", role)
    return bool(rows)


@pytest.mark.processes
async def test_the_password_never_appears_in_output_or_config_reprs(
    workspace: Path, pg_url: str, tmp_path: Path
) -> None:
    role = f"acode_secret_tester_{os.getpid()}_{secrets.token_hex(3)}"
    password = f"S3cr3t-Pa55-xyzzy-{secrets.token_hex(4)}"
    database = urlsplit(pg_url).path.lstrip("/")
    db = WorkspaceDatabase(workspace)
    try:
        saved = [db.save(Session(title=f"secret test {i}")) for i in range(3)]
    finally:
        db.close()

    for in_query in (False, True):
        url = with_credentials(pg_url, role, password, in_query=in_query)
        config = load_config(None, {"ACODE_POSTGRES_URL": url, "XDG_CONFIG_HOME": str(tmp_path)})
        assert config.postgres.resolved_password() == password  # it was read, and kept apart
        for text in (
            repr(config),
            str(config),
            f"{config.postgres}",
            config.postgres.dsn,
            config.postgres.connect_dsn(),
            config.postgres.host_description(),
        ):
            assert password not in text
            assert quote(password) not in text

    await pg_execute(ADMIN_URL, f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    try:
        await pg_execute(ADMIN_URL, f'GRANT CREATE ON DATABASE "{database}" TO {role}')
        with closing(dead_port()) as refused:
            port = int(refused.getsockname()[1])
            for in_query in (False, True):
                url = with_port(with_credentials(pg_url, role, password, in_query=in_query), port)
                done = await anyio.to_thread.run_sync(run_cli, workspace, url, tmp_path)
                output = done.stdout + done.stderr
                assert done.returncode == PostgresUnavailableError.exit_code, output
                assert "ACODE-DB-005" in done.stderr, output
                assert password not in output
                assert quote(password) not in output
        assert_untouched(workspace, set(outbox(workspace)))

        url = with_credentials(pg_url, role, password, in_query=False)
        done = await anyio.to_thread.run_sync(run_cli, workspace, url, tmp_path)
        output = done.stdout + done.stderr
        assert done.returncode == 0, output
        assert done.stdout.startswith(f"applied {len(saved)},"), output
        assert password not in output
        # It really connected as the role from the URL.
        owner = await pg_fetch(
            pg_url, "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'acode'"
        )
        assert [r[0] for r in owner] == [role]
    finally:
        if await role_exists(role):
            await pg_execute(pg_url, f"DROP OWNED BY {role} CASCADE")
        await pg_execute(ADMIN_URL, f"DROP ROLE IF EXISTS {role}")
        assert not await role_exists(role)
