"""Wake-up on write: which workspaces' databases changed.

On Linux, inotify on each workspace's `.agent/` directory: the daemon sleeps in the event
loop on the inotify descriptor and uses no CPU while idle. Elsewhere, a cheap stat poll.
Events are hints: the worker compares file signatures to ignore its own commits.
"""

from __future__ import annotations

import sys
from contextlib import suppress
from pathlib import Path
from typing import Final, Protocol

import anyio
import anyio.to_thread

from acode_sync.discovery import Signature, files_signature
from acode_sync.workspace import AGENT_DIR, DATABASE_NAME

WATCHED_NAMES: Final = frozenset({DATABASE_NAME, f"{DATABASE_NAME}-wal"})
POLL_SECONDS: Final = 1.0


class Watcher(Protocol):
    def add(self, workspace: Path) -> None: ...
    def remove(self, workspace: Path) -> None: ...
    async def changed(self) -> set[Path]: ...
    def close(self) -> None: ...


class InotifyWatcher:
    def __init__(self) -> None:
        from inotify_simple import INotify, flags

        self._inotify = INotify()
        # A commit writes the WAL (MODIFY); a database replaced whole is MOVED_TO. Opening
        # or closing a connection (CREATE, CLOSE_WRITE) is not a commit: a read-only check
        # of the outbox must not wake the daemon again.
        self._mask = flags.MODIFY | flags.MOVED_TO
        self._by_descriptor: dict[int, Path] = {}
        self._by_workspace: dict[Path, int] = {}

    def add(self, workspace: Path) -> None:
        if workspace in self._by_workspace:
            return
        descriptor = self._inotify.add_watch(workspace / AGENT_DIR, self._mask)
        self._by_descriptor[descriptor] = workspace
        self._by_workspace[workspace] = descriptor

    def remove(self, workspace: Path) -> None:
        descriptor = self._by_workspace.pop(workspace, None)
        if descriptor is not None:
            self._by_descriptor.pop(descriptor, None)
            with suppress(OSError):  # the directory is gone, and its watch with it
                self._inotify.rm_watch(descriptor)

    async def changed(self) -> set[Path]:
        while True:
            await anyio.wait_readable(self._inotify.fileno())
            events = self._inotify.read(timeout=0)
            found = {
                self._by_descriptor[e.wd]
                for e in events
                if e.wd in self._by_descriptor and e.name in WATCHED_NAMES
            }
            if found:
                return found

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

    def _scan(self) -> set[Path]:
        changed = set()
        for workspace, before in list(self._signatures.items()):
            now = files_signature(workspace)
            if now != before:
                self._signatures[workspace] = now
                changed.add(workspace)
        return changed

    async def changed(self) -> set[Path]:
        while True:
            await anyio.sleep(self.interval)
            found = await anyio.to_thread.run_sync(self._scan)
            if found:
                return found

    def close(self) -> None:
        self._signatures.clear()


def make_watcher(platform: str = sys.platform) -> Watcher:
    if platform == "linux":
        return InotifyWatcher()
    return PollingWatcher()
