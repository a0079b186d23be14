"""Which workspaces to watch: config roots and patterns -> workspace directories.

Blocking (it walks directories): call it off the event loop.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path
from typing import Final

from acode_sync.config import DaemonSettings
from acode_sync.workspace import AGENT_DIR, DATABASE_NAME

SQLITE_HEADER: Final = b"SQLite format 3\x00"
SKIPPED_DIRS: Final = frozenset({"node_modules", "__pycache__", "venv", ".venv", ".git"})


def is_sqlite_file(path: Path) -> bool:
    try:
        with path.open("rb") as file:
            return file.read(len(SQLITE_HEADER)) == SQLITE_HEADER
    except OSError:
        return False


def _walk(root: Path, max_depth: int) -> Iterator[Path]:
    """Directories under root (root included) down to max_depth, never following links."""
    yield root
    if max_depth == 0:
        return
    try:
        entries = list(os.scandir(root))
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith(".") or entry.name in SKIPPED_DIRS:
            continue
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(Path(entry.path), max_depth - 1)


def _matches(relative: str, settings: DaemonSettings) -> bool:
    included = any(fnmatch(relative, pattern) for pattern in settings.include)
    return included and not any(fnmatch(relative, pattern) for pattern in settings.exclude)


def discover(
    settings: DaemonSettings, cwd: Path, known: frozenset[Path] = frozenset()
) -> set[Path]:
    """Every directory holding a SQLite `.agent/workspace.db` under the roots. With no roots
    configured, only the current directory's workspace.

    The header of a `known` workspace's database is not read again: this process may hold
    SQLite connections to it, and closing any other descriptor of that file would drop
    their POSIX locks, so another process closing its last connection would delete the
    WAL under them (their later commits lost)."""
    roots, depth = (settings.roots, settings.max_depth) if settings.roots else ((cwd,), 0)
    found = set()
    for root in roots:
        for directory in _walk(root, depth):
            database = directory / AGENT_DIR / DATABASE_NAME
            if not database.is_file():
                continue
            resolved = directory.resolve()
            if resolved not in known and not is_sqlite_file(database):
                continue
            relative = directory.relative_to(root).as_posix()
            if _matches(relative, settings):
                found.add(resolved)
    return found


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
