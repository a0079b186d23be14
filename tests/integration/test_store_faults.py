"""The workspace store under contention and crashes: real child processes, real locks,
real SIGKILL, real SQLite files. Nothing is mocked.

Children are `python -c` scripts that import acode_sync; they report readiness on stdout.
Timing is used only as a generous upper bound that turns a hang into a failure.
"""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, closing, suppress
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from acode_sync.domain import ENTITY_CLASSES, Entity, Session, SessionState
from acode_sync.errors import BusyError
from acode_sync.migrations import load_migrations
from acode_sync.store import WorkspaceDatabase, WorkspaceStore
from acode_sync.workspace import DIALECT, FINE_LOCK_WAIT, OpenOptions, database_path

HANG = 30.0  # seconds: far beyond anything these tests need, even on a loaded machine
SHORT_BUSY_TIMEOUT = 0.3
ID_COLUMNS = {
    "sessions": "session_id",
    "session_events": "event_id",
    "session_tasks": "task_id",
    "steps": "step_id",
    "tool_calls": "tool_call_id",
    "artifacts": "artifact_id",
}


# --- helpers -------------------------------------------------------------------------


def query(path: Path, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        return conn.execute(sql, params).fetchall()


def count(path: Path, table: str) -> int:
    return int(query(path, f"SELECT count(*) FROM {table}")[0][0])


class Child:
    """A running `python -c` child with line-oriented stdout."""

    def __init__(self, process: Process) -> None:
        assert process.stdout is not None
        self.process = process
        self._stdout = BufferedByteReceiveStream(process.stdout)

    async def line(self) -> str:
        try:
            with anyio.fail_after(HANG):
                return (await self._stdout.receive_until(b"\n", 1 << 16)).decode()
        except (anyio.IncompleteRead, anyio.EndOfStream):
            pytest.fail(f"the child exited before writing a line:\n{await self.stderr()}")

    async def send(self, text: str) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send(text.encode())

    async def stderr(self) -> str:
        assert self.process.stderr is not None
        chunks = []
        with anyio.move_on_after(HANG):
            async for chunk in self.process.stderr:
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    async def exit_code(self) -> int:
        with anyio.fail_after(HANG):
            return await self.process.wait()

    async def kill(self) -> int:
        with suppress(ProcessLookupError):  # it may have exited already: its code says how
            self.process.send_signal(signal.SIGKILL)
        return await self.exit_code()


@asynccontextmanager
async def child(code: str, *args: str) -> AsyncIterator[Child]:
    """Start a child; kill it on the way out if the test left it running."""
    async with await anyio.open_process([sys.executable, "-c", code, *args]) as process:
        try:
            yield Child(process)
        finally:
            if process.returncode is None:
                process.kill()


async def expect_busy(
    store: WorkspaceStore, entity: Entity, release: Callable[[], Awaitable[object]]
) -> BusyError:
    """Save while someone else holds the write lock and return the BusyError it raises.

    A save runs in a worker thread that cannot be cancelled, so a hang is caught this way:
    after HANG seconds a watchdog releases the lock, the hung save then goes through, and
    the test fails with "DID NOT RAISE" instead of hanging.
    """
    async with anyio.create_task_group() as tasks:

        async def watchdog() -> None:
            await anyio.sleep(HANG)
            await release()

        tasks.start_soon(watchdog)
        try:
            with pytest.raises(BusyError) as info:
                await store.save(entity)
        finally:
            tasks.cancel_scope.cancel()
    assert info.value.code == "ACODE-DB-004"
    return info.value


def assert_outbox_matches_entities(path: Path) -> dict[str, int]:
    """Every entity row has exactly the outbox records of its versions, and no more.

    Per entity, outbox records in commit order form a chain: the first has no base
    version, each next one's base is the version the previous one carried, and the last
    carries exactly the row as it is now. Every outbox record names an existing entity.
    Returns the row count of each entity table.
    """
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        history: dict[tuple[str, str], list[dict[str, Any]]] = {}
        keys = set()
        for key, entity_type, entity_id, base, payload in conn.execute(
            "SELECT idempotency_key, entity_type, entity_id, base_updated_at, payload "
            "FROM outbox ORDER BY outbox_id"
        ):
            record = json.loads(payload)
            versions = history.setdefault((entity_type, entity_id), [])
            assert base == (versions[-1]["updated_at"] if versions else None), (key, versions)
            assert key == f"{entity_type}:{entity_id}:{record['updated_at']}"
            versions.append(record)
            keys.add(key)
        assert len(keys) == sum(len(v) for v in history.values())

        rows: dict[tuple[str, str], dict[str, Any]] = {}
        counts = {}
        for cls in ENTITY_CLASSES:
            id_column = ID_COLUMNS[cls.table]
            cursor = conn.execute(f"SELECT * FROM {cls.table}")
            names = [d[0] for d in cursor.description]
            counts[cls.table] = 0
            for values in cursor:
                row = dict(zip(names, values, strict=True))
                for column in cls.json_columns:
                    if row[column] is not None:
                        row[column] = json.loads(row[column])
                extra = row.pop("extra")  # unknown keys a restore wrote: in the payload too
                if extra is not None:
                    row |= {k: v for k, v in json.loads(extra).items() if k not in row}
                rows[(cls.entity_type, row[id_column])] = row
                counts[cls.table] += 1
    orphans = history.keys() - rows.keys()
    assert not orphans, f"outbox records without their entity: {sorted(orphans)[:5]}"
    unqueued = rows.keys() - history.keys()
    assert not unqueued, f"entities without an outbox record: {sorted(unqueued)[:5]}"
    for entity, row in rows.items():
        assert history[entity][-1] == row, entity
    return counts


def wal_of(path: Path) -> Path:
    return path.with_name(path.name + "-wal")


# --- child scripts -------------------------------------------------------------------

HOLD_WRITE_LOCK = r"""
import sys
from pathlib import Path
from acode_sync.workspace import open_workspace

conn = open_workspace(Path(sys.argv[1]))
conn.execute("PRAGMA cache_size = -64")  # a long transaction: its pages spill to disk
conn.execute("BEGIN IMMEDIATE")
stamp = "2026-01-01T00:00:00.000000Z"
conn.execute("UPDATE sessions SET title = 'uncommitted'")
conn.execute(
    "INSERT INTO sessions (session_id, title, created_at, updated_at) VALUES (?, ?, ?, ?)",
    ("sess_uncommitted", "uncommitted", stamp, stamp),
)
conn.executemany(
    "INSERT INTO session_tasks (task_id, session_id, status, created_at) VALUES (?, ?, ?, ?)",
    [(f"task_bulk{i:04d}", "sess_uncommitted", "x" * 2000, stamp) for i in range(200)],
)
print("locked", flush=True)
command = sys.stdin.readline().strip()
conn.execute("COMMIT" if command == "commit" else "ROLLBACK")
conn.close()
print("done", flush=True)
"""

SAVE_SESSIONS = r"""
import sys
from dataclasses import replace
from pathlib import Path

import anyio

from acode_sync.domain import Session, SessionState
from acode_sync.store import WorkspaceStore

workspace, name, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
print("ready", flush=True)
sys.stdin.readline()  # all writers start at once


async def main() -> None:
    async with await WorkspaceStore.open(workspace) as store:
        for i in range(n):
            session = await store.save(Session(title=f"{name}-{i}", metadata={"i": i}))
            session = await store.save(replace(session, state=SessionState.PLANNING))
            await store.save(replace(session, state=SessionState.EXECUTING, title=f"{name}-{i}!"))


anyio.run(main)
"""

KILLED_MID_TRANSACTION = r"""
import sys
from pathlib import Path
from acode_sync.workspace import open_workspace

conn = open_workspace(Path(sys.argv[1]))
conn.execute("PRAGMA cache_size = -64")  # 64 KiB: the open transaction spills into the WAL
conn.execute("BEGIN IMMEDIATE")
stamp = "2026-01-01T00:00:00.000000Z"
for i in range(300):
    # Half a save each way: an entity row without its outbox record ...
    conn.execute(
        "INSERT INTO sessions (session_id, title, created_at, updated_at) VALUES (?, ?, ?, ?)",
        (f"sess_torn{i:04d}", "x" * 2000, stamp, stamp),
    )
    # ... and an outbox record without its entity row.
    conn.execute(
        "INSERT INTO outbox (idempotency_key, entity_type, entity_id, session_id, payload, "
        "created_at) VALUES (?, 'Session', ?, ?, '{}', ?)",
        (f"Session:sess_ghost{i:04d}:{stamp}", f"sess_ghost{i:04d}", f"sess_ghost{i:04d}", stamp),
    )
print("ready", flush=True)
sys.stdin.readline()
"""

SAVE_FOREVER = r"""
import sys
from dataclasses import replace
from pathlib import Path

import anyio

from acode_sync.domain import Artifact, Session, SessionState, SessionTask, Step, ToolCall
from acode_sync.store import WorkspaceStore


async def main() -> None:
    async with await WorkspaceStore.open(Path(sys.argv[1])) as store:
        n = 0
        while True:
            session = await store.save(Session(title=f"loop {n}", metadata={"n": n}))
            sid = session.session_id
            await store.append_event(sid, "started", {"n": n})
            task = await store.save(SessionTask(session_id=sid, title="task"))
            step = await store.save(Step(session_id=sid, task_id=task.task_id))
            call = await store.save(
                ToolCall(session_id=sid, step_id=step.step_id, name="bash", arguments={"n": n})
            )
            await store.save(replace(call, status="done", result={"exit": 0}))
            await store.save(Artifact(session_id=sid, type="log", content="x" * 5000))
            session = await store.save(replace(session, state=SessionState.EXECUTING))
            await store.save(replace(session, state=SessionState.COMPLETED))
            n += 1
            if n == 2:
                print("ready", flush=True)


anyio.run(main)
"""

ACODE_CLI = "import sys; from acode_sync.cli import main; sys.exit(main(sys.argv[1:]))"


# --- 2. the busy timeout: fail with BusyError, never hang ----------------------------


@pytest.mark.anyio
async def test_a_save_fails_busy_while_another_connection_holds_the_write_lock(
    store: WorkspaceStore, workspace: Path
) -> None:
    await store.save(Session(title="before"))
    holder = sqlite3.connect(store.path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        async with await WorkspaceStore.open(
            workspace, OpenOptions(busy_timeout=SHORT_BUSY_TIMEOUT)
        ) as impatient:
            refused = Session(title="refused")

            async def release() -> None:
                holder.execute("ROLLBACK")

            started = anyio.current_time()
            await expect_busy(impatient, refused, release)
            # It did wait for the lock (load only makes this longer), then gave up.
            assert anyio.current_time() - started >= SHORT_BUSY_TIMEOUT / 2
            holder.execute("ROLLBACK")

            assert await impatient.get(Session, refused.session_id) is None
            assert count(store.path, "sessions") == count(store.path, "outbox") == 1
            await impatient.save(refused)  # the lock is free again: the same save lands
            assert count(store.path, "sessions") == count(store.path, "outbox") == 2
    finally:
        holder.close()


@pytest.mark.parametrize("held_for", [FINE_LOCK_WAIT / 5, FINE_LOCK_WAIT * 3])
def test_a_save_waits_for_a_write_lock_held_briefly(workspace: Path, held_for: float) -> None:
    """Within the fine polling window and past it (SQLite's own busy handler then), a save
    waits for the lock and lands, and the connection keeps its busy timeout."""
    db = WorkspaceDatabase(workspace, OpenOptions(busy_timeout=SHORT_BUSY_TIMEOUT * 10))
    try:
        holder = sqlite3.connect(
            database_path(workspace), isolation_level=None, check_same_thread=False
        )
        holder.execute("BEGIN IMMEDIATE")
        release = threading.Timer(held_for, holder.execute, ("COMMIT",))
        release.start()
        try:
            saved = db.save(Session(title="waited"))
        finally:
            release.join()
            holder.close()
        assert db.get(Session, saved.session_id) == saved
        timeout_ms = db.conn.execute("PRAGMA busy_timeout").fetchone()[0]
        assert timeout_ms == SHORT_BUSY_TIMEOUT * 10 * 1000
    finally:
        db.close()


@pytest.mark.anyio
@pytest.mark.processes
async def test_a_save_fails_busy_while_another_process_holds_the_write_lock(
    store: WorkspaceStore, workspace: Path
) -> None:
    before = await store.save(Session(title="before"))
    async with (
        await WorkspaceStore.open(
            workspace, OpenOptions(busy_timeout=SHORT_BUSY_TIMEOUT)
        ) as impatient,
        child(HOLD_WRITE_LOCK, str(workspace)) as holder,
    ):
        assert await holder.line() == "locked"
        refused = Session(title="refused")
        await expect_busy(impatient, refused, holder.kill)
        await expect_busy(impatient, replace(before, state=SessionState.PLANNING), holder.kill)

        await holder.send("rollback\n")
        assert await holder.line() == "done"
        assert await holder.exit_code() == 0
        assert await impatient.get(Session, refused.session_id) is None
        assert await impatient.get(Session, before.session_id) == before
        assert count(store.path, "sessions") == count(store.path, "outbox") == 1


@pytest.mark.anyio
async def test_first_open_waits_for_the_write_lock_instead_of_failing_busy(
    workspace: Path,
) -> None:
    """Regression: switching a new database to WAL does not call SQLite's busy handler,
    so a second agent creating the same workspace failed at once with ACODE-DB-004."""
    path = database_path(workspace)
    path.parent.mkdir(mode=0o700)
    holder = sqlite3.connect(path, isolation_level=None)  # another process creating it
    try:
        holder.execute("BEGIN IMMEDIATE")

        async def release() -> None:
            await anyio.sleep(1.0)
            holder.execute("COMMIT")

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(release)
            opened = await WorkspaceStore.open(workspace, OpenOptions(busy_timeout=10))
        async with opened:
            await opened.save(Session(title="created after the wait"))
    finally:
        holder.close()
    assert query(path, "PRAGMA journal_mode") == [("wal",)]
    assert count(path, "sessions") == count(path, "outbox") == 1


# --- 3. AC-008: concurrent writer processes ------------------------------------------


@pytest.mark.anyio
@pytest.mark.processes
async def test_concurrent_writer_processes_all_land_ac_008(workspace: Path) -> None:
    writers, per_writer = 4, 25
    names = [f"w{k}" for k in range(writers)]
    async with AsyncExitStack() as stack:
        children = [
            await stack.enter_async_context(
                child(SAVE_SESSIONS, str(workspace), name, str(per_writer))
            )
            for name in names
        ]
        for writer in children:
            assert await writer.line() == "ready"
        # All start at once, into a workspace that none of them has created yet.
        for writer in children:
            await writer.send("go\n")
        outcomes = [(await writer.exit_code(), await writer.stderr()) for writer in children]
    assert outcomes == [(0, "")] * writers

    path = database_path(workspace)
    expected = writers * per_writer
    assert count(path, "sessions") == expected
    assert count(path, "outbox") == 3 * expected
    assert query(path, "SELECT count(DISTINCT idempotency_key) FROM outbox") == [(3 * expected,)]
    titles = query(path, "SELECT title, state FROM sessions")
    assert sorted(titles) == sorted(
        (f"{name}-{i}!", "EXECUTING") for name in names for i in range(per_writer)
    )
    assert query(path, "SELECT count(*) FROM workspace_meta WHERE key = 'origin_id'") == [(1,)]
    shipped = [(m.version,) for m in load_migrations(DIALECT)]
    assert query(path, "SELECT version FROM schema_migrations ORDER BY version") == shipped
    assert_outbox_matches_entities(path)


# --- 4. AC-007: readers are not blocked by a writer ----------------------------------


@pytest.mark.anyio
@pytest.mark.processes
async def test_readers_keep_reading_while_another_process_holds_a_write_transaction_ac_007(
    store: WorkspaceStore, workspace: Path
) -> None:
    committed = await store.save(Session(title="committed"))
    async with (
        await WorkspaceStore.open(
            workspace, OpenOptions(busy_timeout=SHORT_BUSY_TIMEOUT)
        ) as reader,
        child(HOLD_WRITE_LOCK, str(workspace)) as writer,
    ):
        assert await writer.line() == "locked"
        # A blocked read would wait out the short busy timeout and raise BusyError.
        for _ in range(10):
            assert await reader.get(Session, committed.session_id) == committed
            assert await reader.get(Session, "sess_uncommitted") is None
            page = await reader.list_sessions()
            assert page.items == (committed,)
        # The writer really holds the lock: a write from here must wait, and gives up.
        await expect_busy(reader, Session(title="blocked"), writer.kill)

        await writer.send("commit\n")
        assert await writer.line() == "done"
        assert await writer.exit_code() == 0
        now = await reader.get(Session, committed.session_id)
        assert now is not None
        assert now.title == "uncommitted"
        assert await reader.get(Session, "sess_uncommitted") is not None


@pytest.mark.anyio
@pytest.mark.processes
async def test_another_process_reads_while_this_one_holds_a_write_transaction_ac_007(
    store: WorkspaceStore, workspace: Path
) -> None:
    for i in range(3):
        await store.save(Session(title=f"committed {i}"))
    writer = sqlite3.connect(store.path, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("DELETE FROM outbox")
        writer.execute("DELETE FROM sessions")
        status_command = ["db", "status", "--json", "--workspace", str(workspace)]
        with anyio.fail_after(HANG):
            done = await anyio.run_process(
                [sys.executable, "-c", ACODE_CLI, *status_command], check=False
            )
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        status = json.loads(done.stdout)
        assert status["rows"]["sessions"] == 3
        assert status["rows"]["outbox"] == 3
        assert writer.in_transaction
    finally:
        writer.execute("ROLLBACK")
        writer.close()


# --- 5. SIGKILL: never half a save -----------------------------------------------------


@pytest.mark.anyio
@pytest.mark.processes
async def test_a_writer_killed_mid_transaction_leaves_no_half_save(
    store: WorkspaceStore, workspace: Path
) -> None:
    kept = {(await store.save(Session(title=f"kept {i}"))).session_id for i in range(3)}
    wal = wal_of(store.path)
    wal_before = wal.stat().st_size
    async with child(KILLED_MID_TRANSACTION, str(workspace)) as writer:
        assert await writer.line() == "ready"
        # The uncommitted pages really reached the WAL file before the crash.
        assert wal.stat().st_size > wal_before
        assert await writer.kill() == -signal.SIGKILL

    counts = assert_outbox_matches_entities(store.path)
    assert counts["sessions"] == 3
    assert count(store.path, "outbox") == 3
    page = await store.list_sessions()
    assert {s.session_id for s in page.items} == kept
    await store.save(Session(title="after the crash"))  # the lock died with the writer
    assert assert_outbox_matches_entities(store.path)["sessions"] == 4


@pytest.mark.anyio
@pytest.mark.processes
async def test_writers_killed_at_random_moments_leave_entities_and_outbox_consistent(
    workspace: Path,
) -> None:
    rng = random.Random()
    path = database_path(workspace)
    delays: list[float] = []
    sessions = 0
    for _ in range(3):
        delays.append(rng.uniform(0.0, 0.25))
        async with child(SAVE_FOREVER, str(workspace)) as writer:
            assert await writer.line() == "ready"
            await anyio.sleep(delays[-1])
            code = await writer.kill()
            assert code == -signal.SIGKILL, await writer.stderr()
        counts = assert_outbox_matches_entities(path)
        assert counts["sessions"] >= sessions + 2, delays
        sessions = counts["sessions"]
