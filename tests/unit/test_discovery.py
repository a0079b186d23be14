from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest

from acode_sync.config import DaemonSettings
from acode_sync.discovery import discover, files_signature, is_sqlite_file
from acode_sync.runtime import read_status, remove_status, state_dir, write_status
from acode_sync.store import WorkspaceDatabase
from acode_sync.systemd import Notifier, watchdog_interval
from acode_sync.watcher import InotifyWatcher, PollingWatcher, make_watcher


def make_workspace(path: Path) -> Path:
    path.mkdir(parents=True)
    WorkspaceDatabase(path).close()
    return path


def test_discovery_walks_roots_to_a_bounded_depth(tmp_path: Path) -> None:
    root = tmp_path / "src"
    shallow = make_workspace(root / "a")
    deep = make_workspace(root / "team" / "b")
    too_deep = make_workspace(root / "x" / "y" / "z")
    make_workspace(root / "node_modules" / "pkg")
    make_workspace(root / ".hidden")
    fake = root / "fake" / ".agent"
    fake.mkdir(parents=True)
    (fake / "workspace.db").write_text("not sqlite")
    settings = DaemonSettings(roots=(root,), max_depth=2)
    assert discover(settings, tmp_path).workspaces == {shallow, deep}
    assert too_deep not in discover(settings, tmp_path).workspaces
    only_team = DaemonSettings(roots=(root,), max_depth=3, include=("team/*",))
    assert discover(only_team, tmp_path).workspaces == {deep}
    no_team = DaemonSettings(roots=(root,), max_depth=3, exclude=("team/*",))
    assert discover(no_team, tmp_path).workspaces == {shallow, too_deep}
    assert discover(settings, root / "missing").workspaces == {shallow, deep}


def test_without_roots_only_the_current_directory(tmp_path: Path) -> None:
    here = make_workspace(tmp_path / "here")
    make_workspace(here / "child")
    assert discover(DaemonSettings(), here).workspaces == {here}
    assert discover(DaemonSettings(), tmp_path).workspaces == set()


def test_known_workspaces_are_not_reopened(tmp_path: Path) -> None:
    workspace = make_workspace(tmp_path / "w")
    database = workspace / ".agent" / "workspace.db"
    settings = DaemonSettings(roots=(tmp_path,), max_depth=1)
    database.chmod(0)  # unreadable: a header check would fail
    try:
        assert discover(settings, tmp_path, frozenset({workspace})).workspaces == {workspace}
        if os.geteuid() != 0:
            assert not is_sqlite_file(database)
    finally:
        database.chmod(0o600)


def test_file_signature_changes_with_a_commit(tmp_path: Path) -> None:
    workspace = make_workspace(tmp_path / "w")
    before = files_signature(workspace)
    db = WorkspaceDatabase(workspace)
    from acode_sync.domain import Session

    db.save(Session())
    assert files_signature(workspace) != before
    db.close()
    assert files_signature(tmp_path / "nothing") == (None, None)


@pytest.mark.anyio
async def test_polling_watcher_reports_changed_workspaces(tmp_path: Path) -> None:
    from acode_sync.domain import Session

    quiet = make_workspace(tmp_path / "quiet")
    busy = make_workspace(tmp_path / "busy")
    watcher = PollingWatcher(interval=0.05)
    watcher.add(quiet)
    watcher.add(busy)
    db = WorkspaceDatabase(busy)
    db.save(Session())
    with anyio.fail_after(10):
        assert await watcher.changed() == {busy}
    db.close()
    watcher.remove(busy)
    watcher.close()


@pytest.mark.anyio
async def test_inotify_watcher_reports_commits_not_reads(tmp_path: Path) -> None:
    from acode_sync.domain import Session

    workspace = make_workspace(tmp_path / "w")
    watcher = make_watcher("linux")
    assert isinstance(watcher, InotifyWatcher)
    watcher.add(workspace)
    watcher.add(workspace)  # twice is once
    db = WorkspaceDatabase(workspace)  # opening is not a commit
    db.save(Session())
    with anyio.fail_after(10):
        assert await watcher.changed() == {workspace}
    db.close()
    watcher.remove(workspace)
    watcher.remove(workspace)
    watcher.close()
    assert isinstance(make_watcher("darwin"), PollingWatcher)


def test_state_dir_resolution(tmp_path: Path) -> None:
    assert state_dir(DaemonSettings(state_dir=tmp_path), {}) == tmp_path
    assert state_dir(DaemonSettings(), {"RUNTIME_DIRECTORY": "/run/a:/run/b"}) == Path("/run/a")
    assert state_dir(DaemonSettings(), {"XDG_RUNTIME_DIR": "/run/user/7"}) == Path(
        "/run/user/7/acode-syncd"
    )
    assert state_dir(DaemonSettings(), {}).name == "acode-syncd"


def test_status_file_of_a_live_or_dead_process(tmp_path: Path) -> None:
    assert read_status(tmp_path) is None
    write_status(tmp_path / "state", {"pid": os.getpid(), "backlog": 3})
    assert read_status(tmp_path / "state") == {"pid": os.getpid(), "backlog": 3}
    write_status(tmp_path / "state", {"pid": 2**22 + 12345})
    assert read_status(tmp_path / "state") is None
    write_status(tmp_path / "state", {"pid": 1})  # alive, maybe not ours to signal
    assert read_status(tmp_path / "state") == {"pid": 1}
    remove_status(tmp_path / "state")
    remove_status(tmp_path / "state")
    assert read_status(tmp_path / "state") is None


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    assert watchdog_interval({}, 5) is None
    assert watchdog_interval({"WATCHDOG_USEC": "2000000"}, 5) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "5"}, 5) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "6"}, 5) is None


def test_notifier_without_a_socket_does_nothing() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    notifier.ready("x")
    notifier.watchdog()
