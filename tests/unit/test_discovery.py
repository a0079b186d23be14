from __future__ import annotations

import os
import shutil
from pathlib import Path

import anyio
import pytest

from acode_sync.config import DaemonSettings
from acode_sync.discovery import discover, files_signature, is_sqlite_file
from acode_sync.domain import Session
from acode_sync.errors import ConfigError
from acode_sync.runtime import (
    find_state_dir,
    hold_state_dir,
    read_status,
    remove_status,
    state_dir,
    write_status,
)
from acode_sync.store import WorkspaceDatabase
from acode_sync.systemd import Notifier, watchdog_interval
from acode_sync.watcher import Changes, InotifyWatcher, PollingWatcher, make_watcher


def make_workspace(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
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
    db.save(Session())
    assert files_signature(workspace) != before
    db.close()
    assert files_signature(tmp_path / "nothing") == (None, None)


@pytest.mark.anyio
async def test_polling_watcher_reports_changed_workspaces(tmp_path: Path) -> None:
    quiet = make_workspace(tmp_path / "quiet")
    busy = make_workspace(tmp_path / "busy")
    watcher = PollingWatcher(interval=0.05)
    watcher.add(quiet)
    watcher.add(busy)
    db = WorkspaceDatabase(busy)
    db.save(Session())
    with anyio.fail_after(10):
        assert (await watcher.changed()).workspaces == {busy}
    db.close()
    watcher.remove(busy)
    watcher.close()


@pytest.mark.anyio
async def test_inotify_watcher_reports_commits_not_reads(tmp_path: Path) -> None:
    workspace = make_workspace(tmp_path / "w")
    watcher = make_watcher("linux")
    assert isinstance(watcher, InotifyWatcher)
    watcher.add(workspace)
    watcher.add(workspace)  # twice is once
    db = WorkspaceDatabase(workspace)  # opening is not a commit
    db.save(Session())
    with anyio.fail_after(10):
        assert (await watcher.changed()).workspaces == {workspace}
    db.close()
    watcher.remove(workspace)
    watcher.remove(workspace)
    watcher.close()
    assert isinstance(make_watcher("darwin"), PollingWatcher)


async def _tree_event(watcher: InotifyWatcher) -> bool:
    """Whether the pending inotify events ask for a rescan (False: none within 0.3 s)."""
    with anyio.move_on_after(0.3):
        return (await watcher.changed()).tree
    return False


@pytest.mark.anyio
async def test_inotify_watcher_sees_new_workspaces_under_the_roots(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    settings = DaemonSettings(roots=(root,), max_depth=1)
    watcher = make_watcher("linux")
    assert isinstance(watcher, InotifyWatcher)
    assert watcher.watch_tree(discover(settings, tmp_path).directories) is True
    assert watcher.watch_tree(discover(settings, tmp_path).directories) is False  # unchanged

    (root / "node_modules").mkdir()  # skipped: no rescan
    assert await _tree_event(watcher) is False
    (root / "project").mkdir()  # depth 1 may hold a workspace
    assert await _tree_event(watcher) is True
    assert watcher.watch_tree(discover(settings, tmp_path).directories) is True
    (root / "project" / "src").mkdir()  # depth 2: below max_depth
    assert await _tree_event(watcher) is False
    (root / "project" / ".agent").mkdir()
    assert await _tree_event(watcher) is True
    assert watcher.watch_tree(discover(settings, tmp_path).directories) is True  # .agent
    make_workspace(root / "project")
    assert await _tree_event(watcher) is True
    found = discover(settings, tmp_path)
    assert found.workspaces == {(root / "project").resolve()}
    watcher.watch_tree(found.directories)

    # Known, it is woken by its commits and asks for no more rescans.
    watcher.add((root / "project").resolve())
    db = WorkspaceDatabase(root / "project")
    db.save(Session())
    with anyio.fail_after(10):
        changes = await watcher.changed()
    assert changes == Changes({(root / "project").resolve()}, tree=False)
    db.close()

    # Removed directories lose their watches; a smaller tree drops the others.
    shutil.rmtree(root / "node_modules")
    watcher.remove((root / "project").resolve())
    assert watcher.watch_tree({root: True}) is False
    shutil.rmtree(root / "project")
    assert await _tree_event(watcher) is False
    assert watcher.watch_tree({root / "gone": True}) is False  # no such directory
    watcher.close()


def test_state_dir_resolution(tmp_path: Path) -> None:
    assert state_dir(DaemonSettings(state_dir=tmp_path), {}) == tmp_path
    assert state_dir(DaemonSettings(), {"RUNTIME_DIRECTORY": "/run/a:/run/b"}) == Path("/run/a")
    assert state_dir(DaemonSettings(), {"XDG_RUNTIME_DIR": "/run/user/7"}) == Path(
        "/run/user/7/acode-syncd/default"
    )
    assert state_dir(DaemonSettings(), {}).parent.name == "acode-syncd"


def test_each_configuration_file_has_its_own_state_dir(tmp_path: Path) -> None:
    """Two daemons of one user, each with its own file, never share a status file."""
    env = {"XDG_RUNTIME_DIR": str(tmp_path / "run")}
    one = state_dir(DaemonSettings(), env, tmp_path / "a" / "acode-syncd.toml")
    two = state_dir(DaemonSettings(), env, tmp_path / "b" / "acode-syncd.toml")
    assert one != two
    assert one.parent == two.parent == tmp_path / "run" / "acode-syncd"
    assert one.name.startswith("acode-syncd-")
    assert state_dir(DaemonSettings(), env, tmp_path / "a" / "acode-syncd.toml") == one


def test_an_invalid_file_still_names_its_daemons_state_dir(tmp_path: Path) -> None:
    env = {"XDG_RUNTIME_DIR": str(tmp_path / "run")}
    named = tmp_path / "named.toml"
    named.write_text(f'[daemon]\nstate_dir = "{tmp_path / "mine"}"\n[postgres]\npool_max = 0\n')
    directory, error = find_state_dir(named, env)
    assert directory == tmp_path / "mine"
    assert error is not None
    assert error.code == "ACODE-DB-007"
    assert "pool_max" in error.message
    broken = tmp_path / "broken.toml"
    broken.write_text("[daemon\n")
    directory, error = find_state_dir(broken, env)
    assert directory == state_dir(DaemonSettings(), env, broken)
    assert error is not None
    valid = tmp_path / "valid.toml"
    valid.write_text("[daemon]\nmax_depth = 1\n")
    assert find_state_dir(valid, env) == (state_dir(DaemonSettings(), env, valid), None)


def test_one_daemon_per_state_dir(tmp_path: Path) -> None:
    held = hold_state_dir(tmp_path / "state")
    try:
        with pytest.raises(ConfigError, match=rf"pid {os.getpid()}\) already runs"):
            hold_state_dir(tmp_path / "state")
    finally:
        os.close(held)
    os.close(hold_state_dir(tmp_path / "state"))  # free again once the holder is gone


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
