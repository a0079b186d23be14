"""The workspace database as files on a real disk: creation and modes, schema guarantees,
bad and foreign files, read-only and full disks, hostile text, schema versions, migrations.

Real SQLite files only; nothing is mocked. Tests that mount a file system need root and
CAP_SYS_ADMIN and are skipped, with the reason, where mounting is refused.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sqlite3
import subprocess
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from acode_sync.cli import main as acode_main
from acode_sync.domain import (
    Artifact,
    Entity,
    Session,
    SessionEvent,
    SessionState,
    SessionTask,
    Step,
    ToolCall,
    new_id,
)
from acode_sync.errors import (
    EX_SOFTWARE,
    MigrationError,
    RecordRejectedError,
    SchemaMismatchError,
    WorkspaceOpenError,
)
from acode_sync.migrations import Migration, load_migrations, parse_migrations
from acode_sync.store import WorkspaceDatabase, WorkspaceStore
from acode_sync.workspace import (
    DEFAULT_BUSY_TIMEOUT,
    DIALECT,
    OpenOptions,
    database_path,
    file_mode,
    migrate,
    open_workspace,
    schema_version,
)

ENTITY_TABLES = (
    "sessions",
    "session_events",
    "session_tasks",
    "steps",
    "tool_calls",
    "artifacts",
)


# --- helpers -------------------------------------------------------------------------


def query(path: Path, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Run one statement on a fresh autocommit connection that is always closed."""
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        return conn.execute(sql, params).fetchall()


def count(path: Path, table: str) -> int:
    return int(query(path, f"SELECT count(*) FROM {table}")[0][0])


def entity_count(path: Path) -> int:
    return sum(count(path, table) for table in ENTITY_TABLES)


def table_names(path: Path) -> set[str]:
    rows = query(path, "SELECT name FROM sqlite_master WHERE type = 'table'")
    return {str(name) for (name,) in rows}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def wal_of(path: Path) -> Path:
    return path.with_name(path.name + "-wal")


def shm_of(path: Path) -> Path:
    return path.with_name(path.name + "-shm")


def checkpoint(path: Path) -> None:
    """Move everything from the WAL into the main file, so its hash is the whole database."""
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        assert busy == 0
    wal = wal_of(path)
    assert not wal.exists() or wal.stat().st_size == 0


async def make_workspace(workspace: Path, *titles: str) -> Path:
    """Create and migrate a workspace through the store, save sessions, close it."""
    async with await WorkspaceStore.open(workspace) as store:
        for title in titles:
            await store.save(Session(title=title))
    return database_path(workspace)


async def open_and_use(workspace: Path) -> None:
    """Open the store, write and read through it: whichever step fails first raises."""
    async with await WorkspaceStore.open(workspace, OpenOptions(busy_timeout=2)) as store:
        saved = await store.save(Session(title="written"))
        assert await store.get(Session, saved.session_id) == saved
        await store.list_sessions()


# --- mounts (root only) --------------------------------------------------------------


def _mount_or_skip(*args: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a file system needs root")
    try:
        result = subprocess.run(
            ["mount", *args], capture_output=True, text=True, check=False, timeout=30
        )
    except FileNotFoundError:
        pytest.skip("there is no mount command here")
    if result.returncode != 0:
        pytest.skip(f"cannot mount here (mount {' '.join(args)}): {result.stderr.strip()}")


def _unmount(target: Path) -> None:
    done = subprocess.run(["umount", str(target)], capture_output=True, check=False, timeout=30)
    if done.returncode != 0:  # something still holds it open: detach it anyway
        subprocess.run(["umount", "-l", str(target)], check=True, timeout=30)


@contextmanager
def tmpfs(target: Path, size: str) -> Iterator[None]:
    _mount_or_skip("-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(target))
    try:
        yield
    finally:
        _unmount(target)


@contextmanager
def read_only(target: Path) -> Iterator[None]:
    """Make a file or directory read-only for this process.

    chmod does not stop root, so as root a read-only bind mount of the target is used.
    """
    if os.geteuid() != 0:
        mode = file_mode(target)
        target.chmod(mode & 0o555)
        try:
            yield
        finally:
            target.chmod(mode)
        return
    _mount_or_skip("--bind", str(target), str(target))
    try:
        remount = subprocess.run(
            ["mount", "-o", "remount,ro,bind", str(target)],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        if remount.returncode != 0:
            pytest.skip(f"cannot remount a bind mount read-only: {remount.stderr.strip()}")
        yield
    finally:
        _unmount(target)


def fill_disk(directory: Path) -> Path:
    """Write a file until the file system reports ENOSPC; return its path."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for size in (1 << 16, 1 << 12, 1):
            block = b"\0" * size
            while True:
                try:
                    os.write(fd, block)
                except OSError as error:
                    if error.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    assert os.statvfs(directory).f_bavail == 0
    return filler


# --- 1. creation, modes, journal mode, STRICT, foreign keys --------------------------


@pytest.mark.anyio
async def test_first_access_creates_private_files_in_wal_mode_even_under_umask_0(
    workspace: Path,
) -> None:
    path = database_path(workspace)
    assert not path.parent.exists()
    previous = os.umask(0)
    try:
        async with await WorkspaceStore.open(workspace) as store:
            await store.save(Session(title="first"))
            wal, shm = wal_of(path), shm_of(path)
            assert wal.exists()
            assert shm.exists()
            assert file_mode(path.parent) == 0o700
            assert file_mode(path) == 0o600
            assert file_mode(wal) == 0o600
            assert file_mode(shm) == 0o600
    finally:
        os.umask(previous)
    assert sorted(p.name for p in path.parent.iterdir()) == ["workspace.db"]
    assert query(path, "PRAGMA journal_mode") == [("wal",)]


@pytest.mark.anyio
async def test_every_table_is_strict(store: WorkspaceStore) -> None:
    tables = {
        name: strict
        for schema, name, kind, _, _, strict in query(store.path, "PRAGMA table_list")
        if schema == "main" and kind == "table"
    }
    # sqlite_sequence (AUTOINCREMENT's bookkeeping) and sqlite_schema belong to SQLite,
    # which creates them itself and never as STRICT tables.
    ours = {name: strict for name, strict in tables.items() if not name.startswith("sqlite_")}
    outbox_tables = {"outbox_records", "outbox_sync", "outbox_progress", "outbox_errors"}
    assert {"schema_migrations", "workspace_meta", *outbox_tables, *ENTITY_TABLES} <= ours.keys()
    assert {name for name, strict in ours.items() if strict != 1} == set()
    in_master = {n for n in table_names(store.path) if not n.startswith("sqlite_")}
    assert in_master == ours.keys()
    # The one view, over the outbox tables (a view has no STRICT).
    assert query(store.path, "SELECT name FROM sqlite_master WHERE type = 'view'") == [("outbox",)]


def _orphan_step(session_id: str) -> Entity:
    return Step(session_id=session_id, task_id="task_does_not_exist")


def _orphan_tool_call(session_id: str) -> Entity:
    return ToolCall(session_id=session_id, step_id="step_does_not_exist", name="bash")


def _orphan_artifact(_: str) -> Entity:
    return Artifact(session_id="sess_does_not_exist", type="log", content="x")


def _orphan_event(_: str) -> Entity:
    return SessionEvent(session_id="sess_does_not_exist", event_type="started")


def _orphan_task(_: str) -> Entity:
    return SessionTask(session_id="sess_does_not_exist")


@pytest.mark.anyio
@pytest.mark.parametrize(
    "orphan",
    [_orphan_step, _orphan_tool_call, _orphan_artifact, _orphan_event, _orphan_task],
    ids=["step-without-task", "tool-call-without-step", "artifact", "event", "task"],
)
async def test_foreign_keys_are_enforced_and_nothing_is_queued(
    store: WorkspaceStore, orphan: Callable[[str], Entity]
) -> None:
    session = await store.save(Session(title="parent"))
    entity = orphan(session.session_id)
    with pytest.raises(RecordRejectedError) as info:
        await store.save(entity)
    assert info.value.code == "ACODE-DB-006"
    assert "FOREIGN" in info.value.message
    assert count(store.path, entity.table) == 0
    assert query(store.path, "SELECT entity_id FROM outbox") == [(session.session_id,)]
    # The refused save left no transaction open: the next save goes through.
    await store.save(Session(title="after"))
    assert count(store.path, "outbox") == 2


# --- 2. busy timeout default ----------------------------------------------------------


def test_default_busy_timeout_is_30_seconds(workspace: Path) -> None:
    assert OpenOptions().busy_timeout == DEFAULT_BUSY_TIMEOUT == 30.0
    db = WorkspaceDatabase(workspace)
    try:
        assert db.conn.execute("PRAGMA busy_timeout").fetchone() == (30000,)
    finally:
        db.close()
    conn = open_workspace(workspace)
    try:
        assert conn.execute("PRAGMA busy_timeout").fetchone() == (30000,)
    finally:
        conn.close()


# --- 6. files that are not (intact) SQLite databases ---------------------------------


@pytest.mark.anyio
async def test_a_file_that_is_not_a_database_is_refused_and_left_untouched(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = database_path(workspace)
    path.parent.mkdir(mode=0o700)
    text = b"this is a note somebody saved where the database belongs.\n"
    path.write_bytes((text * (4096 // len(text) + 1))[:4096])
    before = digest(path)

    with pytest.raises(WorkspaceOpenError) as info:
        await WorkspaceStore.open(workspace)
    assert info.value.code == "ACODE-DB-001"
    assert "SQLITE_NOTADB" in info.value.message

    assert acode_main(["db", "status", "--workspace", str(workspace)]) == EX_SOFTWARE
    assert acode_main(["db", "migrate", "--workspace", str(workspace)]) == EX_SOFTWARE
    assert capsys.readouterr().err.count("ACODE-DB-001") == 2

    assert digest(path) == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["workspace.db"]


@pytest.mark.anyio
async def test_a_corrupted_database_is_refused_with_workspace_open_error(
    workspace: Path,
) -> None:
    path = await make_workspace(workspace, *(f"session {i}" for i in range(20)))
    assert not wal_of(path).exists()  # the last close checkpointed everything
    data = path.read_bytes()
    page_size = int(query(path, "PRAGMA page_size")[0][0])
    assert len(data) > 4 * page_size
    garbage = bytes(range(256)) * (len(data) // 256 + 1)
    path.write_bytes(data[:page_size] + garbage[: len(data) - page_size])
    before = digest(path)

    with pytest.raises(WorkspaceOpenError) as info:
        await open_and_use(workspace)
    assert info.value.code == "ACODE-DB-001"
    assert "SQLITE_CORRUPT" in info.value.message
    assert digest(path) == before


# --- 7. read-only and full disks ------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.processes
@pytest.mark.parametrize("what", ["directory", "file"])
async def test_a_read_only_database_is_refused_and_left_untouched(
    workspace: Path, what: str
) -> None:
    path = await make_workspace(workspace, "kept")
    before = digest(path)
    target = path.parent if what == "directory" else path
    with read_only(target):
        with pytest.raises(WorkspaceOpenError) as info:
            await open_and_use(workspace)
        assert info.value.code == "ACODE-DB-001"
    assert digest(path) == before
    assert query(path, "SELECT title FROM sessions") == [("kept",)]
    assert count(path, "outbox") == 1


@pytest.mark.anyio
@pytest.mark.processes
async def test_a_full_disk_fails_the_save_and_keeps_the_database_consistent(
    workspace: Path,
) -> None:
    with tmpfs(workspace, "1m"):
        async with await WorkspaceStore.open(workspace, OpenOptions(busy_timeout=2)) as store:
            session = await store.save(Session(title="before the disk filled"))
            await store.save(Artifact(session_id=session.session_id, type="log", content="a"))
            filler = fill_disk(workspace)

            refused = Session(title="t" * 20_000)
            with pytest.raises(WorkspaceOpenError) as info:
                await store.save(refused)
            assert info.value.code == "ACODE-DB-001"
            assert "SQLITE_FULL" in info.value.message
            with pytest.raises(WorkspaceOpenError):
                await store.save(replace(session, state=SessionState.PLANNING))

            assert await store.get(Session, refused.session_id) is None
            assert entity_count(store.path) == count(store.path, "outbox") == 2
            assert query(store.path, "PRAGMA integrity_check") == [("ok",)]

            filler.unlink()
            saved = await store.save(refused)
            assert saved.title == refused.title
            assert entity_count(store.path) == count(store.path, "outbox") == 3
        assert query(database_path(workspace), "PRAGMA integrity_check") == [("ok",)]


# --- 8. hostile text round-trips exactly ---------------------------------------------

NASTY = [
    "",
    "'",
    '"',
    "''",
    "\\",
    "'); DROP TABLE sessions; --",
    '"); DROP TABLE outbox; --',
    "x' OR '1'='1",
    "Robert'); DELETE FROM outbox WHERE ('1'='1",
    "\x00",
    "a\x00b",
    "\x00'); DROP TABLE artifacts; --",
    "%s %d {0} ${x} :name ?1 @p $1",
    "-- comment",
    "/* open comment",
    "\u2028\u2029",
    "\ufeff",
    "e\u0301",
    "😀👩‍👩‍👧",
    "\U0010ffff",
    "\x7f\x1b[31m",
    "\r\n\t",
    "null",
    '{"not": "json"',
    "NaN",
]
texts = st.one_of(st.text(), st.sampled_from(NASTY))
big_texts = st.tuples(st.text(min_size=1, max_size=5), st.integers(20_000, 100_000)).map(
    lambda parts: (parts[0] * parts[1])[:100_000]
)
any_text = st.one_of(texts, big_texts)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12,
)
metadata_values = st.one_of(json_values, big_texts.map(lambda big: {"big": big}))
HUNDRED_KB = ("'); DROP TABLE sessions; --\x00é😀" * 4000)[:100_000]


@pytest.fixture(scope="module")
def strings_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkspaceDatabase]:
    db = WorkspaceDatabase(tmp_path_factory.mktemp("strings"))
    try:
        yield db
    finally:
        db.close()


def latest_payload(db: WorkspaceDatabase, entity_id: str) -> tuple[str, Any]:
    key, payload = db.conn.execute(
        "SELECT idempotency_key, payload FROM outbox WHERE entity_id = ? "
        "ORDER BY outbox_id DESC LIMIT 1",
        (entity_id,),
    ).fetchone()
    return str(key), json.loads(payload)


@settings(max_examples=50, deadline=None, database=None)
@given(
    title=st.none() | any_text,
    metadata=metadata_values,
    content=any_text,
    id_suffix=st.text(max_size=60),
)
@example(
    title="'); DROP TABLE sessions; --",
    metadata={"'); DROP TABLE outbox; --": ["\x00", HUNDRED_KB]},
    content=HUNDRED_KB,
    id_suffix="'); DROP TABLE artifacts; --",
)
@example(title="a\x00b", metadata="\x00", content="\x00", id_suffix="\x00")
def test_arbitrary_text_round_trips_exactly(
    strings_db: WorkspaceDatabase,
    title: str | None,
    metadata: Any,
    content: str,
    id_suffix: str,
) -> None:
    db = strings_db
    tables_before = table_names(db.path)
    session = db.save(
        Session(session_id=new_id("sess") + id_suffix, title=title, metadata=metadata)
    )
    artifact = db.save(
        Artifact(
            artifact_id=new_id("art") + id_suffix,
            session_id=session.session_id,
            type=content[:50],
            content=content,
            name=title,
        )
    )

    assert session.title == title
    assert session.metadata == metadata
    assert db.get(Session, session.session_id) == session
    assert db.get(Artifact, artifact.artifact_id) == artifact
    raw = db.conn.execute(
        "SELECT title, typeof(title) FROM sessions WHERE session_id = ?", (session.session_id,)
    ).fetchall()
    assert raw == [(title, "null" if title is None else "text")]
    stored_content = db.conn.execute(
        "SELECT content FROM artifacts WHERE artifact_id = ?", (artifact.artifact_id,)
    ).fetchall()
    assert stored_content == [(content,)]

    for saved in (session, artifact):
        key, payload = latest_payload(db, saved.entity_id)
        assert key == f"{saved.entity_type}:{saved.entity_id}:{saved.updated_at}"
        assert payload == saved.row()
    assert latest_payload(db, session.session_id)[1]["title"] == title
    assert latest_payload(db, session.session_id)[1]["metadata"] == metadata
    assert latest_payload(db, artifact.artifact_id)[1]["content"] == content

    assert table_names(db.path) == tables_before
    counts = db.conn.execute(
        "SELECT (SELECT count(*) FROM sessions) + (SELECT count(*) FROM artifacts), "
        "(SELECT count(*) FROM outbox)"
    ).fetchone()
    assert counts[0] == counts[1]


def _surrogate_title(_: str) -> Entity:
    return Session(title="\ud800")


def _surrogate_metadata_value(_: str) -> Entity:
    return Session(metadata={"k": ["ok", "\udfff"]})


def _surrogate_metadata_key(_: str) -> Entity:
    return Session(metadata={"\ud800": 1})


def _surrogate_session_id(_: str) -> Entity:
    return Session(session_id="sess_\ud800")


def _surrogate_content(session_id: str) -> Entity:
    return Artifact(session_id=session_id, type="log", content="a\ud800b")


@pytest.mark.anyio
@pytest.mark.parametrize(
    "make",
    [
        _surrogate_title,
        _surrogate_metadata_value,
        _surrogate_metadata_key,
        _surrogate_session_id,
        _surrogate_content,
    ],
    ids=["title", "metadata-value", "metadata-key", "session-id", "artifact-content"],
)
async def test_a_lone_surrogate_is_rejected_not_crashed_on(
    store: WorkspaceStore, make: Callable[[str], Entity]
) -> None:
    parent = await store.save(Session(title="parent"))
    with pytest.raises(RecordRejectedError) as info:
        await store.save(make(parent.session_id))
    assert info.value.code == "ACODE-DB-006"
    assert entity_count(store.path) == count(store.path, "outbox") == 1
    await store.save(Session(title="the store still works"))
    assert entity_count(store.path) == count(store.path, "outbox") == 2


# --- 9. a schema this program does not own -------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    "tamper",
    [
        "INSERT INTO schema_migrations (version, name, checksum, created_at) "
        "VALUES (999, 'from_the_future', 'f00d', '2030-01-01T00:00:00.000000Z')",
        "UPDATE schema_migrations SET checksum = 'edited' WHERE version = 1",
    ],
    ids=["newer-version", "edited-migration"],
)
async def test_a_schema_this_program_does_not_own_is_refused_and_not_modified(
    workspace: Path, tamper: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = await make_workspace(workspace, "kept")
    query(path, tamper)
    checkpoint(path)
    before = digest(path)

    with pytest.raises(SchemaMismatchError) as info:
        await WorkspaceStore.open(workspace)
    assert info.value.code == "ACODE-DB-003"
    for command in (["db", "migrate"], ["db", "status"], ["db", "schema", "version"]):
        assert acode_main([*command, "--workspace", str(workspace)]) == EX_SOFTWARE
    assert capsys.readouterr().err.count("ACODE-DB-003") == 3

    wal = wal_of(path)
    assert not wal.exists() or wal.stat().st_size == 0
    assert digest(path) == before


# --- 10. a failing migration changes nothing -----------------------------------------

BAD_MIGRATION = "CREATE TABLE t (x INT) STRICT; INSERT INTO nope VALUES (1);"


SHIPPED = load_migrations(DIALECT)
LATEST = SHIPPED[-1].version


def migrations_with_a_bad_last() -> tuple[Migration, ...]:
    """The shipped migrations, then a failing one."""
    files = [(f"{m.version:04d}_{m.name}.sql", m.sql) for m in SHIPPED]
    return parse_migrations([*files, (f"{LATEST + 1:04d}_bad.sql", BAD_MIGRATION)])


def dump(conn: sqlite3.Connection) -> list[str]:
    return list(conn.iterdump())


@pytest.mark.anyio
async def test_a_failing_migration_leaves_the_database_exactly_as_it_was(
    workspace: Path,
) -> None:
    path = await make_workspace(workspace, "kept")
    conn = open_workspace(workspace)
    try:
        assert schema_version(conn) == LATEST
        before = dump(conn)
        cookie = conn.execute("PRAGMA schema_version").fetchone()
        with pytest.raises(MigrationError) as info:
            migrate(conn, available=migrations_with_a_bad_last())
        assert info.value.code == "ACODE-DB-002"
        assert f"migration {LATEST + 1} (bad)" in info.value.message
        assert not conn.in_transaction
        assert schema_version(conn) == LATEST
        assert "t" not in table_names(path)
        assert conn.execute("PRAGMA schema_version").fetchone() == cookie
        assert dump(conn) == before
    finally:
        conn.close()
    async with await WorkspaceStore.open(workspace) as store:
        await store.save(Session(title="still usable"))
    assert count(path, "sessions") == 2


def test_a_failing_first_migration_batch_leaves_an_empty_database(workspace: Path) -> None:
    conn = open_workspace(workspace, run_migrations=False)
    try:
        with pytest.raises(MigrationError) as info:
            migrate(conn, available=migrations_with_a_bad_last())
        assert info.value.code == "ACODE-DB-002"
        assert not conn.in_transaction
        assert conn.execute("SELECT count(*) FROM sqlite_master").fetchone() == (0,)
        assert schema_version(conn) == 0
    finally:
        conn.close()
    db = WorkspaceDatabase(workspace)  # the shipped migrations still apply cleanly
    try:
        assert schema_version(db.conn) == LATEST
        assert "t" not in table_names(db.path)
    finally:
        db.close()
