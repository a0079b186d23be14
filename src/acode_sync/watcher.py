"""Wake-up on write, and new workspaces under the roots.

On Linux, inotify: on each workspace's `.agent/` directory for its commits, and on the
directories under the roots (down to max_depth) for new directories and new databases.
The daemon sleeps in the event loop on the inotify descriptor and uses no CPU while idle.
Elsewhere, a cheap stat poll of the known workspaces; new ones wait for the rescan.
Events are hints: the worker compares file signatures to ignore its own commits, and a
tree event only asks for a rescan (discovery decides what is a workspace).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol

import anyio
import anyio.to_thread

from acode_sync.discovery import Signature, files_signature, is_skipped
from acode_sync.workspace import AGENT_DIR, DATABASE_NAME

WATCHED_NAMES: Final = frozenset({DATABASE_NAME, f"{DATABASE_NAME}-wal"})
POLL_SECONDS: Final = 1.0


@dataclass(frozen=True, slots=True)
class Changes:
    workspaces: set[Path] = field(default_factory=set)  # known workspaces written to
    tree: bool = False  # something under a root may be a new workspace: rescan


class Watcher(Protocol):
    def add(self, workspace: Path) -> None: ...
    def remove(self, workspace: Path) -> None: ...
    def watch_tree(self, directories: Mapping[Path, bool]) -> bool: ...
    async def changed(self) -> Changes: ...
    def close(self) -> None: ...


class InotifyWatcher:
    """inotify keeps one watch per directory (a second add_watch replaces its mask), so
    every `.agent` directory has the same mask, whether its workspace is known yet."""

    def __init__(self) -> None:
        from inotify_simple import INotify, flags

        self._flags = flags
        self._inotify = INotify()
        # A commit writes the WAL (MODIFY); a database replaced whole is MOVED_TO. Opening
        # or closing a connection (CREATE, CLOSE_WRITE) is not a commit: a read-only check
        # of the outbox must not wake the daemon again. CREATE only tells of a new
        # database in a `.agent` of no known workspace.
        self._agent_mask = (
            flags.MODIFY | flags.MOVED_TO | flags.CREATE | flags.ONLYDIR | flags.DONT_FOLLOW
        )
        self._tree_mask = flags.CREATE | flags.MOVED_TO | flags.ONLYDIR | flags.DONT_FOLLOW
        self._workspace_of: dict[int, Path] = {}  # a known workspace's `.agent` watch
        self._by_workspace: dict[Path, int] = {}
        self._agents: set[int] = set()  # every `.agent` watch
        self._tree: dict[Path, int] = {}  # directories under the roots, `.agent` ones too
        self._subdirectories_count: dict[int, bool] = {}

    def _watch(self, directory: Path, mask: int) -> int:
        return int(self._inotify.add_watch(directory, mask))

    def add(self, workspace: Path) -> None:
        if workspace in self._by_workspace:
            return
        descriptor = self._watch(workspace / AGENT_DIR, self._agent_mask)
        self._agents.add(descriptor)
        self._workspace_of[descriptor] = workspace
        self._by_workspace[workspace] = descriptor

    def remove(self, workspace: Path) -> None:
        descriptor = self._by_workspace.pop(workspace, None)
        if descriptor is None:
            return
        self._workspace_of.pop(descriptor, None)
        if descriptor not in self._tree.values():
            self._forget(descriptor)
            with suppress(OSError):  # the directory is gone, and its watch with it
                self._inotify.rm_watch(descriptor)

    def watch_tree(self, directories: Mapping[Path, bool]) -> bool:
        """Watch exactly these directories (and their `.agent`, where there is one) for
        what could be a new workspace. True if a watch was added: what was created in
        it before now sent no event, so the caller looks again."""
        wanted: dict[Path, tuple[int, bool]] = {}
        for directory, subdirectories_count in directories.items():
            wanted[directory] = (self._tree_mask, subdirectories_count)
            agent = directory / AGENT_DIR
            if agent.is_dir() and not agent.is_symlink():
                wanted[agent] = (self._agent_mask, False)
        added = False
        for directory in set(self._tree) - set(wanted):
            descriptor = self._tree.pop(directory)
            if descriptor not in self._tree.values() and descriptor not in self._workspace_of:
                self._forget(descriptor)
                with suppress(OSError):
                    self._inotify.rm_watch(descriptor)
        for directory, (mask, subdirectories_count) in wanted.items():
            if directory in self._tree:
                if mask == self._tree_mask:  # max_depth may have changed
                    self._subdirectories_count[self._tree[directory]] = subdirectories_count
                continue
            try:
                descriptor = self._watch(directory, mask)
            except OSError:
                continue  # gone, not a directory, or out of watches: the rescan covers it
            self._tree[directory] = descriptor
            if mask == self._agent_mask:
                self._agents.add(descriptor)
            else:
                self._subdirectories_count[descriptor] = subdirectories_count
            added = True
        return added

    def _forget(self, descriptor: int) -> None:
        self._agents.discard(descriptor)
        self._subdirectories_count.pop(descriptor, None)
        self._workspace_of.pop(descriptor, None)
        for directory in [d for d, wd in self._tree.items() if wd == descriptor]:
            del self._tree[directory]

    def _classify(self, descriptor: int, mask: int, name: str, changes: Changes) -> bool:
        """Add one event to `changes`; True if it asks for a rescan."""
        flags = self._flags
        if mask & flags.Q_OVERFLOW:
            return True  # events were lost
        if mask & flags.IGNORED:  # the directory is gone, and its watch with it
            self._forget(descriptor)
            return False
        if descriptor in self._agents:
            workspace = self._workspace_of.get(descriptor)
            if workspace is None:
                # A database appears where none was known (MODIFY: its header is written
                # after the file is created). Its WAL is left out: a refused workspace's
                # commits must not cost a rescan each.
                return name == DATABASE_NAME
            if mask & (flags.MODIFY | flags.MOVED_TO) and name in WATCHED_NAMES:
                changes.workspaces.add(workspace)
            return False
        if descriptor in self._subdirectories_count:
            if name == AGENT_DIR:
                return True
            can_hold = self._subdirectories_count[descriptor] and not is_skipped(name)
            return bool(mask & flags.ISDIR) and can_hold
        return False

    async def changed(self) -> Changes:
        while True:
            await anyio.wait_readable(self._inotify.fileno())
            changes = Changes(set())
            tree = False
            for event in self._inotify.read(timeout=0):
                tree |= self._classify(event.wd, event.mask, event.name, changes)
            if tree or changes.workspaces:
                return Changes(changes.workspaces, tree)

    def close(self) -> None:
        self._inotify.close()


class PollingWatcher:
    """Portable fallback: stat each workspace's files every POLL_SECONDS."""

    def __init__(self, interval: float = POLL_SECONDS) -> None:
        self.interval = interval
        self._signatures: dict[Path, Signature] = {}

    def add(self, workspace: Path) -> None:
        self._signatures.setdefault(workspace, files_signature(workspace))

    def remove(self, workspace: Path) -> None:
        self._signatures.pop(workspace, None)

    def watch_tree(self, directories: Mapping[Path, bool]) -> bool:
        return False  # new workspaces wait for the rescan

    def _scan(self) -> set[Path]:
        changed = set()
        for workspace, before in list(self._signatures.items()):
            now = files_signature(workspace)
            if now != before:
                self._signatures[workspace] = now
                changed.add(workspace)
        return changed

    async def changed(self) -> Changes:
        while True:
            await anyio.sleep(self.interval)
            found = await anyio.to_thread.run_sync(self._scan)
            if found:
                return Changes(found)

    def close(self) -> None:
        self._signatures.clear()


def make_watcher(platform: str = sys.platform) -> Watcher:
    if platform == "linux":
        return InotifyWatcher()
    return PollingWatcher()
