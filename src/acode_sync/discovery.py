"""Which workspaces to watch: config roots and patterns -> workspace directories, and
which were refused.

Blocking (it walks directories): call it off the event loop.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Final

from acode_sync.config import DaemonSettings
from acode_sync.errors import WorkspaceOpenError
from acode_sync.workspace import (
    AGENT_DIR,
    DATABASE_NAME,
    DatabaseId,
    check_workspace_files,
    database_path,
    mount_points,
)

SQLITE_HEADER: Final = b"SQLite format 3\x00"
SKIPPED_DIRS: Final = frozenset({"node_modules", "__pycache__", "venv", ".venv", ".git"})


def is_sqlite_file(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    with os.fdopen(fd, "rb") as file:
        return file.read(len(SQLITE_HEADER)) == SQLITE_HEADER


def is_skipped(name: str) -> bool:
    return name.startswith(".") or name in SKIPPED_DIRS


def _walk(root: Path, max_depth: int) -> Iterator[tuple[Path, int]]:
    """Directories under root (root included) down to max_depth, never following links,
    each with the levels left below it."""
    yield root, max_depth
    if max_depth == 0:
        return
    try:
        entries = list(os.scandir(root))
    except OSError:
        return
    for entry in entries:
        if is_skipped(entry.name):
            continue
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(Path(entry.path), max_depth - 1)


def _matches(relative: str, settings: DaemonSettings) -> bool:
    included = any(fnmatch(relative, pattern) for pattern in settings.include)
    return included and not any(fnmatch(relative, pattern) for pattern in settings.exclude)


@dataclass(frozen=True, slots=True)
class Discovery:
    workspaces: set[Path]
    refused: dict[Path, WorkspaceOpenError] = field(default_factory=dict)
    # Every directory examined, and whether a new directory in it could hold a
    # workspace (it is above max_depth): what the watcher watches for new workspaces.
    directories: dict[Path, bool] = field(default_factory=dict)


def discover(
    settings: DaemonSettings, cwd: Path, known: frozenset[Path] = frozenset()
) -> Discovery:
    """Every directory holding a SQLite `.agent/workspace.db` under the roots. With no roots
    configured, only the current directory's workspace.

    A workspace is its database file: paths that reach the same one (a root listed twice,
    a bind mount, a symbolic link above the workspace) are one workspace, a known path
    first. A workspace with a link or a foreign owner where its files should be is
    refused (see check_workspace_files), with the reason.

    The header of a `known` workspace's database is not read again: this process may hold
    SQLite connections to it, and closing any other descriptor of that file would drop
    their POSIX locks, so another process closing its last connection would delete the
    WAL under them (their later commits lost)."""
    roots, depth = (settings.roots, settings.max_depth) if settings.roots else ((cwd,), 0)
    mounts = mount_points()
    candidates: dict[Path, DatabaseId] = {}
    refused: dict[Path, WorkspaceOpenError] = {}
    directories: dict[Path, bool] = {}
    for root in roots:
        for directory, levels_left in _walk(root, depth):
            directories[directory] = levels_left > 0
            database = directory / AGENT_DIR / DATABASE_NAME
            if not os.path.lexists(database):
                continue
            if not _matches(directory.relative_to(root).as_posix(), settings):
                continue
            resolved = directory.resolve()
            try:
                candidates[resolved] = check_workspace_files(resolved, mounts=mounts)
            except WorkspaceOpenError as error:
                refused[resolved] = error
    known_ids = {candidates[path] for path in known if path in candidates}
    paths: dict[DatabaseId, set[Path]] = {}
    for path, database_id in candidates.items():
        if database_id in known_ids or is_sqlite_file(database_path(path)):
            paths.setdefault(database_id, set()).add(path)
    return Discovery({_one_path(same, known) for same in paths.values()}, refused, directories)


def _one_path(paths: set[Path], known: frozenset[Path]) -> Path:
    """The path a database is watched by: the one already watched, else the first name."""
    return min(paths, key=lambda path: (path not in known, str(path)))


Signature = tuple[tuple[int, int] | None, ...]


def files_signature(workspace: Path) -> Signature:
    """(mtime, size) of the database and its WAL: changes with every commit."""
    signature: list[tuple[int, int] | None] = []
    for name in (DATABASE_NAME, f"{DATABASE_NAME}-wal"):
        try:
            info = (workspace / AGENT_DIR / name).stat()
        except OSError:
            signature.append(None)
        else:
            signature.append((info.st_mtime_ns, info.st_size))
    return tuple(signature)
