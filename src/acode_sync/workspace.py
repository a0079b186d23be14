"""Opening a workspace database: files and modes, pragmas, migrations, error codes.

Everything here is synchronous and runs off the event loop (in a worker thread) or in
the CLI. One sqlite3 connection is used by one thread at a time.
"""

from __future__ import annotations

import errno
import os
import re
import select
import sqlite3
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Final, ParamSpec, TypeVar
from urllib.parse import quote

from acode_sync.domain import Clock, format_timestamp, utc_now
from acode_sync.errors import (
    AcodeError,
    BusyError,
    MigrationError,
    RecordRejectedError,
    WorkspaceOpenError,
)
from acode_sync.migrations import (
    AppliedMigration,
    Migration,
    latest_version,
    load_migrations,
    plan_migrations,
)

AGENT_DIR: Final = ".agent"
DATABASE_NAME: Final = "workspace.db"
SYNC_LOCK_NAME: Final = "sync.lock"
# The files SQLite and the syncer open by name next to the database: none may be a link.
SIDE_FILES: Final = (f"{DATABASE_NAME}-wal", f"{DATABASE_NAME}-shm", SYNC_LOCK_NAME)
MOUNTINFO: Final = Path("/proc/self/mountinfo")
DIR_MODE: Final = 0o700
FILE_MODE: Final = 0o600
DEFAULT_BUSY_TIMEOUT: Final = 30.0
# How long, and how finely, a writer polls for the write lock before SQLite's coarser
# busy handler takes over (see _begin_immediate).
FINE_LOCK_WAIT: Final = 0.05
FINE_LOCK_PAUSE: Final = 0.0002
# The syncer checkpoints the WAL after every drain, off the agent's save path; the agent's
# own automatic checkpoint is only a backstop, so it is rarely what slows a save.
DEFAULT_WAL_AUTOCHECKPOINT: Final = 10_000
DIALECT: Final = "sqlite"


class Synchronous(StrEnum):
    """PRAGMA synchronous. FULL (the default) makes every commit durable on power loss."""

    FULL = "FULL"
    NORMAL = "NORMAL"


@dataclass(frozen=True, kw_only=True, slots=True)
class OpenOptions:
    busy_timeout: float = DEFAULT_BUSY_TIMEOUT
    synchronous: Synchronous = Synchronous.FULL
    wal_autocheckpoint: int = DEFAULT_WAL_AUTOCHECKPOINT
    clock: Clock = utc_now


def database_path(workspace: Path) -> Path:
    return workspace / AGENT_DIR / DATABASE_NAME


DatabaseId = tuple[int, int]  # (st_dev, st_ino) of the database file

REFUSED_HINT: Final = (
    "acode-sync opens only a workspace's own files: `.agent/` a directory and "
    "`.agent/workspace.db` a file with a single name, not symbolic links, both owned by the "
    "user running it. Replace the link with the files themselves, or run acode-sync as the "
    "workspace's owner (one daemon per user: acode-syncd@<user>)."
)


def refused(message: str) -> WorkspaceOpenError:
    return WorkspaceOpenError(message, hint=REFUSED_HINT)


_OCTAL_ESCAPE: Final = re.compile(r"\\([0-7]{3})")


def mount_points(mountinfo: Path = MOUNTINFO) -> frozenset[str]:
    """Every mount point of this process (Linux); empty where /proc is not there."""
    try:
        return _parse_mount_points(mountinfo.read_text())
    except OSError:
        return frozenset()


def _parse_mount_points(text: str) -> frozenset[str]:
    # Field 5 is the mount point, with space, tab, newline and backslash octal-escaped.
    return frozenset(
        _OCTAL_ESCAPE.sub(lambda m: chr(int(m[1], 8)), fields[4])
        for line in text.splitlines()
        if len(fields := line.split(" ")) > 4
    )


# The end of a database's real path: `.agent/` and the database are never links.
_DATABASE_SUFFIX: Final = f"/{AGENT_DIR}/{DATABASE_NAME}"


class MountTable:
    """The mount points that may be a workspace database, read again only when the mount
    table changed: a descriptor of /proc/self/mountinfo polls POLLPRI once after each mount
    or unmount (proc(5)). Every sync turn checks its workspace's files; this spares it
    reading and parsing the whole table each time."""

    def __init__(self, path: Path = MOUNTINFO) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._poller = select.poll()
        self._databases: frozenset[str] = frozenset()

    def databases(self) -> frozenset[str]:
        with self._lock:
            if self._fd is None:
                try:
                    self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    return frozenset()  # no /proc: no mount points known, as before
                self._poller.register(self._fd, select.POLLPRI)
                self._read(self._fd)
            elif self._poller.poll(0):  # polled before reading: no change slips between
                self._read(self._fd)
            return self._databases

    def _read(self, fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        points = _parse_mount_points(b"".join(chunks).decode(errors="surrogateescape"))
        self._databases = frozenset(p for p in points if p.endswith(_DATABASE_SUFFIX))


MOUNTS: Final = MountTable()


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return path.lstat()
    except FileNotFoundError:
        return None


def check_workspace_files(workspace: Path, *, mounts: frozenset[str] | None = None) -> DatabaseId:
    """Refuse a workspace whose files could lead elsewhere; return its database's identity.

    `.agent/` and `.agent/workspace.db` must be a real directory and a real file owned by
    this process's effective user, and none of the database's side files a link. The
    database must have one name only: SQLite names its WAL and the sync lock lives after
    the path, so a second name (a hard link, a file bind-mounted elsewhere) would be a
    second WAL and a second lock for the same data. Every path that reaches this database
    then reaches the same `.agent/` directory, hence the same sync lock.
    """
    agent = workspace / AGENT_DIR
    database = agent / DATABASE_NAME
    user = os.geteuid()
    agent_info = _lstat(agent)
    if agent_info is None:
        raise WorkspaceOpenError(f"no workspace database at {database}")
    if stat.S_ISLNK(agent_info.st_mode):
        raise refused(f"{agent} is a symbolic link")
    if not stat.S_ISDIR(agent_info.st_mode):
        raise refused(f"{agent} is not a directory")
    if agent_info.st_uid != user:
        raise refused(f"{agent} is owned by uid {agent_info.st_uid}, not uid {user}")
    info = _lstat(database)
    if info is None:
        raise WorkspaceOpenError(f"no workspace database at {database}")
    if stat.S_ISLNK(info.st_mode):
        raise refused(f"{database} is a symbolic link")
    if not stat.S_ISREG(info.st_mode):
        raise refused(f"{database} is not a regular file")
    if info.st_uid != user:
        raise refused(f"{database} is owned by uid {info.st_uid}, not uid {user}")
    if info.st_nlink != 1:
        raise refused(f"{database} has {info.st_nlink} hard links (a second name)")
    for name in SIDE_FILES:
        side = _lstat(agent / name)
        if side is not None and not stat.S_ISREG(side.st_mode):
            kind = "a symbolic link" if stat.S_ISLNK(side.st_mode) else "not a regular file"
            raise refused(f"{agent / name} is {kind}")
    mounts = MOUNTS.databases() if mounts is None else mounts
    if mounts and os.path.realpath(database) in mounts:
        raise refused(f"{database} is a mount point (a second name)")
    return info.st_dev, info.st_ino


def open_in_agent_dir(workspace: Path, name: str, flags: int, mode: int = FILE_MODE) -> int:
    """os.open `.agent/<name>` following no link, neither `.agent` nor `name`."""
    agent = workspace / AGENT_DIR
    try:
        directory = os.open(agent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR):
            raise refused(f"{agent} is a symbolic link or not a directory") from None
        raise
    try:
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=directory)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise refused(f"{agent / name} is a symbolic link") from None
        raise
    finally:
        os.close(directory)


_BUSY_CODES = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})
_REJECT_CODES = frozenset(
    {sqlite3.SQLITE_CONSTRAINT, sqlite3.SQLITE_MISMATCH, sqlite3.SQLITE_TOOBIG}
)


def translate_error(error: sqlite3.Error, path: Path) -> AcodeError:
    """Map a SQLite error to its ACODE-DB code by SQLite's result code, never by text."""
    code = getattr(error, "sqlite_errorcode", None)
    name = getattr(error, "sqlite_errorname", type(error).__name__)
    primary = code & 0xFF if isinstance(code, int) else None
    if primary in _BUSY_CODES:
        return BusyError(f"{path}: the database lock was not released in time ({name})")
    if primary in _REJECT_CODES or isinstance(
        error, sqlite3.DataError | sqlite3.InterfaceError | sqlite3.ProgrammingError
    ):
        return RecordRejectedError(f"{path}: {name}: {error}")
    return WorkspaceOpenError(f"{path}: {name}: {error}")


P = ParamSpec("P")
R = TypeVar("R")


def translated(path: Path, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """Run fn, turning SQLite's errors (and bad text) into ACODE-DB errors."""
    try:
        return fn(*args, **kwargs)
    except sqlite3.Error as error:
        raise translate_error(error, path) from None
    except UnicodeEncodeError as error:
        raise RecordRejectedError(f"text is not valid Unicode: {error.reason}") from None
    except OSError as error:
        raise WorkspaceOpenError(f"{path}: {error.strerror or error}") from None


@contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE takes the write lock up front, so the busy timeout covers the wait
    and no SQLITE_BUSY can surface halfway through the transaction."""
    _begin_immediate(conn)
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise


def _begin_immediate(conn: sqlite3.Connection) -> None:
    """BEGIN IMMEDIATE, polling for the write lock every FINE_LOCK_PAUSE for up to
    FINE_LOCK_WAIT before SQLite's own busy handler takes over for the rest of the timeout.

    That handler sleeps 1, 2, 5, 10 ... ms between tries: a save that arrives while the
    syncer marks a batch (a ~2 ms statement) would wait 8 ms where 2 ms are enough.
    """
    timeout_ms = int(conn.execute("PRAGMA busy_timeout").fetchone()[0])
    conn.execute("PRAGMA busy_timeout = 0")
    try:
        wait = min(FINE_LOCK_WAIT, timeout_ms / 1000)
        _retry_while_busy(
            lambda: conn.execute("BEGIN IMMEDIATE"), wait, FINE_LOCK_PAUSE, FINE_LOCK_PAUSE
        )
        return
    except sqlite3.OperationalError as error:
        if not _is_busy(error):
            raise
    finally:
        conn.execute(f"PRAGMA busy_timeout = {timeout_ms}")
    conn.execute("BEGIN IMMEDIATE")


def _is_busy(error: sqlite3.OperationalError) -> bool:
    return error.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY


def _retry_while_busy(
    statement: Callable[[], R], seconds: float, pause: float, max_pause: float
) -> R:
    """Run `statement` until it is not refused with SQLITE_BUSY, pausing between tries
    (doubling, up to `max_pause`); the last refusal is raised after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return statement()
        except sqlite3.OperationalError as error:
            if not _is_busy(error) or time.monotonic() >= deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, max_pause)


def _create_private_file(workspace: Path) -> None:
    """Create .agent/ (0700) and an empty database file (0600) whatever the umask, never
    through a link."""
    agent_dir = workspace / AGENT_DIR
    if _lstat(agent_dir) is None:
        with suppress(FileExistsError):
            agent_dir.mkdir(mode=DIR_MODE)
            agent_dir.chmod(DIR_MODE)
    try:
        fd = open_in_agent_dir(workspace, DATABASE_NAME, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)


def _connect(path: Path, options: OpenOptions) -> sqlite3.Connection:
    uri = f"file:{quote(str(path))}?mode=rw"
    conn = sqlite3.connect(
        uri,
        uri=True,
        timeout=options.busy_timeout,
        isolation_level=None,
        check_same_thread=False,
    )
    try:
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute(f"PRAGMA synchronous = {Synchronous(options.synchronous).value}")
        conn.execute(f"PRAGMA wal_autocheckpoint = {int(options.wal_autocheckpoint)}")
        conn.execute("PRAGMA schema_version").fetchone()  # reads the header: not SQLite -> error
    except BaseException:
        conn.close()
        raise
    return conn


def applied_migrations(conn: sqlite3.Connection) -> list[AppliedMigration]:
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
    ).fetchone()
    if exists is None:
        return []
    rows = conn.execute("SELECT version, checksum FROM schema_migrations ORDER BY version")
    return [AppliedMigration(version, checksum) for version, checksum in rows]


def schema_version(conn: sqlite3.Connection) -> int:
    return max((m.version for m in applied_migrations(conn)), default=0)


def split_statements(sql: str) -> list[str]:
    """Split a script into statements (trigger bodies stay whole), dropping comments."""
    statements, current = [], ""
    for line in sql.splitlines(keepends=True):
        if line.lstrip().startswith("--"):
            continue
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    if current.strip():
        raise ValueError(f"incomplete SQL statement at the end of a migration: {current[:60]!r}")
    return statements


_CREATE_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    checksum TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT
) STRICT
"""


def _apply(conn: sqlite3.Connection, migration: Migration, applied_at: str) -> None:
    for statement in split_statements(migration.sql):
        conn.execute(statement)
    conn.execute(
        "INSERT INTO schema_migrations (version, name, checksum, created_at) VALUES (?, ?, ?, ?)",
        (migration.version, migration.name, migration.checksum, applied_at),
    )


def migrate(
    conn: sqlite3.Connection,
    *,
    clock: Clock = utc_now,
    available: tuple[Migration, ...] | None = None,
) -> tuple[int, int]:
    """Run pending migrations in one transaction; return (from_version, to_version).

    A failure rolls everything back, so the database is exactly as it was (AC-013).
    """
    available = load_migrations(DIALECT) if available is None else available
    before = applied_migrations(conn)
    from_version = max((m.version for m in before), default=0)
    if not plan_migrations(before, available) and from_version:
        return from_version, from_version
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Re-plan under the write lock: another process may have migrated meanwhile.
        current = applied_migrations(conn)
        from_version = max((m.version for m in current), default=0)
        pending = plan_migrations(current, available)
        now = format_timestamp(clock())
        conn.execute(_CREATE_MIGRATIONS_TABLE)
        for migration in pending:
            try:
                _apply(conn, migration, now)
            except sqlite3.Error as error:
                raise MigrationError(
                    f"migration {migration.version} ({migration.name}) failed: "
                    f"{getattr(error, 'sqlite_errorname', 'error')}: {error}"
                ) from None
        if pending and not current:
            conn.execute(
                "INSERT INTO workspace_meta (key, value, created_at) VALUES ('origin_id', ?, ?)",
                (str(uuid.uuid4()), now),
            )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return from_version, latest_version(available)


def _switch_to_wal(conn: sqlite3.Connection) -> str:
    """PRAGMA journal_mode = WAL, waiting for the write lock up to the busy timeout.

    SQLite does not call the busy handler for this switch (it asks for the write lock
    while already holding a read lock), so a process creating a workspace while another
    one holds the write lock would get SQLITE_BUSY at once: retry until the timeout.
    """
    timeout = conn.execute("PRAGMA busy_timeout").fetchone()[0] / 1000
    mode = _retry_while_busy(
        lambda: conn.execute("PRAGMA journal_mode = WAL").fetchone()[0], timeout, 0.001, 0.05
    )
    return str(mode)


def upgrade(conn: sqlite3.Connection, path: Path, *, clock: Clock = utc_now) -> tuple[int, int]:
    """Switch to WAL (persistent) and run pending migrations: (from_version, to_version)."""
    mode = _switch_to_wal(conn)
    if mode != "wal":
        raise WorkspaceOpenError(f"{path}: cannot switch to WAL (journal mode is {mode})")
    return migrate(conn, clock=clock)


def open_workspace(
    workspace: Path,
    options: OpenOptions | None = None,
    *,
    create: bool = True,
    run_migrations: bool = True,
) -> sqlite3.Connection:
    """Open (and by default create and migrate) `<workspace>/.agent/workspace.db`."""
    options = options or OpenOptions()
    path = database_path(workspace)

    def _open() -> sqlite3.Connection:
        if create:
            _create_private_file(workspace)
        elif not os.path.lexists(path):
            raise WorkspaceOpenError(
                f"no workspace database at {path}",
                hint="Run `acode db migrate` in the workspace to create it.",
            )
        mounts = MOUNTS.databases()
        checked = check_workspace_files(workspace, mounts=mounts)
        conn = _connect(path, options)
        try:
            # SQLite opens by name: make sure the file it opened is still the one checked.
            if check_workspace_files(workspace, mounts=mounts) != checked:
                raise refused(f"{path} was replaced while it was opened")
            plan_migrations(applied_migrations(conn), load_migrations(DIALECT))
            if run_migrations:
                upgrade(conn, path, clock=options.clock)
        except BaseException:
            conn.close()
            raise
        return conn

    return translated(path, _open)


def origin_id(conn: sqlite3.Connection) -> str:
    row = conn.execute("SELECT value FROM workspace_meta WHERE key = 'origin_id'").fetchone()
    if row is None:
        raise WorkspaceOpenError("the workspace has no origin id; run `acode db migrate`")
    return str(row[0])


def file_mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)
