"""Links, second names and foreign owners in a workspace: refused with ACODE-DB-001, never
followed, never written through; paths that reach one database are one workspace.

Real files, real links, real processes. Bind mounts are made in a private mount namespace
(`unshare -m`), so nothing is left mounted; those tests are skipped where that is refused.
Tests of a foreign owner need root (to chown) and are skipped otherwise.
"""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Final

import pytest

from acode_sync.cli import main as acode_main
from acode_sync.config import DaemonSettings
from acode_sync.discovery import discover
from acode_sync.domain import Session
from acode_sync.errors import WorkspaceOpenError
from acode_sync.runtime import STATUS_NAME, write_status
from acode_sync.status import workspace_status
from acode_sync.store import WorkspaceDatabase
from acode_sync.sync import SyncLock
from acode_sync.workspace import check_workspace_files, mount_points, open_workspace
from tests.daemon_harness import child_env

OTHER_UID: Final = 65534  # nobody
SRC: Final = Path(__file__).resolve().parents[2]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")


def make_workspace(path: Path, sessions: int = 1) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    db = WorkspaceDatabase(path)
    for _ in range(sessions):
        db.save(Session(title="mine"))
    db.close()
    return path


def contents(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under directory with its bytes and mode: to prove nothing changed."""
    return {
        str(path.relative_to(directory)): (path.read_bytes(), path.lstat().st_mode)
        for path in sorted(directory.rglob("*"))
        if path.is_file() and not path.is_symlink()
    }


def opening_ways(workspace: Path) -> dict[str, Callable[[], object]]:
    return {
        "store": lambda: WorkspaceDatabase(workspace).close(),
        "open": lambda: open_workspace(workspace, create=False).close(),
        "status": lambda: workspace_status(workspace),
        "sync lock": lambda: SyncLock(workspace).try_acquire(),
    }


def assert_refused(workspace: Path, reason: str) -> None:
    for way, open_it in opening_ways(workspace).items():
        with pytest.raises(WorkspaceOpenError, match=reason) as caught:
            open_it()
        assert caught.value.code == "ACODE-DB-001", way
        assert "owned by the user running it" in caught.value.hint


LINKED: Final = (".agent", "workspace.db", "workspace.db-wal", "workspace.db-shm", "sync.lock")


@pytest.mark.parametrize("linked", LINKED)
def test_a_link_in_a_workspace_is_refused_and_nothing_is_written_through_it(
    tmp_path: Path, linked: str
) -> None:
    other = make_workspace(tmp_path / "other")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "file").write_bytes(b"keep me")
    workspace = tmp_path / "workspace"
    if linked == ".agent":
        workspace.mkdir()
        (workspace / ".agent").symlink_to(other / ".agent")
    elif linked == "workspace.db":
        (workspace / ".agent").mkdir(parents=True, mode=0o700)
        (workspace / ".agent" / "workspace.db").symlink_to(other / ".agent" / "workspace.db")
    else:
        make_workspace(workspace)
        (workspace / ".agent" / linked).symlink_to(elsewhere / "file")
    before = contents(other), contents(elsewhere)

    assert_refused(workspace, "is a symbolic link")
    found = discover(DaemonSettings(roots=(tmp_path,), max_depth=1), tmp_path)
    assert found.workspaces == {other.resolve()}
    assert list(found.refused) == [workspace.resolve()]
    assert "is a symbolic link" in found.refused[workspace.resolve()].message

    assert (contents(other), contents(elsewhere)) == before


def test_creating_a_workspace_never_creates_through_a_dangling_link(tmp_path: Path) -> None:
    target_dir = tmp_path / "target"
    through_agent = tmp_path / "a"
    through_agent.mkdir()
    (through_agent / ".agent").symlink_to(target_dir)  # dangling: target_dir does not exist
    through_database = tmp_path / "b"
    (through_database / ".agent").mkdir(parents=True)
    (through_database / ".agent" / "workspace.db").symlink_to(tmp_path / "new.db")
    for workspace in (through_agent, through_database):
        with pytest.raises(WorkspaceOpenError, match="symbolic link"):
            WorkspaceDatabase(workspace)
    assert not target_dir.exists()
    assert not (tmp_path / "new.db").exists()


@pytest.mark.parametrize("command", ["status", "schema version", "sync"])
def test_the_cli_says_why_a_linked_workspace_is_refused(
    tmp_path: Path,
    pg_url: str,
    command: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ACODE_POSTGRES_URL", pg_url)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-config"))
    other = make_workspace(tmp_path / "other")
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    (workspace / ".agent").symlink_to(other / ".agent")
    before = contents(other)
    code = acode_main(["db", *command.split(), "--workspace", str(workspace)])
    out, err = capsys.readouterr()
    assert code == 1
    assert out == ""
    assert err.startswith(f"ACODE-DB-001: {workspace / '.agent'} is a symbolic link")
    assert contents(other) == before


@needs_root
@pytest.mark.parametrize("owned", [".agent", ".agent/workspace.db"])
def test_a_workspace_owned_by_another_user_is_refused(tmp_path: Path, owned: str) -> None:
    workspace = make_workspace(tmp_path / "theirs")
    os.chown(workspace / owned, OTHER_UID, OTHER_UID)
    before = contents(workspace)
    assert_refused(workspace, f"is owned by uid {OTHER_UID}, not uid 0")
    found = discover(DaemonSettings(roots=(tmp_path,), max_depth=1), tmp_path)
    assert found.workspaces == set()
    assert "owned by uid" in found.refused[workspace.resolve()].message
    assert contents(workspace) == before


def test_a_database_with_a_second_name_is_refused(tmp_path: Path) -> None:
    first = make_workspace(tmp_path / "first")
    second = tmp_path / "second"
    (second / ".agent").mkdir(parents=True, mode=0o700)
    os.link(first / ".agent" / "workspace.db", second / ".agent" / "workspace.db")
    for workspace in (first, second):
        assert_refused(workspace, "has 2 hard links")
    found = discover(DaemonSettings(roots=(tmp_path,), max_depth=1), tmp_path)
    assert found.workspaces == set()
    assert set(found.refused) == {first.resolve(), second.resolve()}


def test_paths_that_reach_one_directory_are_one_workspace(tmp_path: Path) -> None:
    real = make_workspace(tmp_path / "real" / "w")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    roots = (tmp_path / "real", tmp_path / "link", tmp_path / "real")
    found = discover(DaemonSettings(roots=roots, max_depth=1), tmp_path)
    assert found.workspaces == {real.resolve()}
    assert found.refused == {}


def test_mount_points_are_read_with_their_escapes(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 1 0:21 / / rw shared:1 - ext4 /dev/root rw\n"
        "40 22 0:21 /a /home/u/my\\040work/.agent/workspace.db rw - ext4 /dev/root rw\n"
    )
    assert mount_points(mountinfo) == {"/", "/home/u/my work/.agent/workspace.db"}
    assert mount_points(tmp_path / "absent") == frozenset()


def in_mount_namespace(binds: list[tuple[Path, Path]], code: str) -> str:
    """Run Python `code` in a private mount namespace with `binds` bind-mounted."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare here")
    mounts = [f"mount --bind {shlex.quote(str(a))} {shlex.quote(str(b))}" for a, b in binds]
    python = f"exec {shlex.quote(sys.executable)} -c {shlex.quote(textwrap.dedent(code))}"
    result = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", " && ".join([*mounts, python])],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(PYTHONPATH=os.pathsep.join([str(SRC / "src"), str(SRC)])),
        check=False,
    )
    if result.returncode != 0 and "mount" in result.stderr and "Traceback" not in result.stderr:
        pytest.skip(f"mounting is refused here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_bind_mount_is_the_same_workspace_and_a_file_mount_is_refused(tmp_path: Path) -> None:
    tmp_path = tmp_path.resolve()
    real = make_workspace(tmp_path / "real" / "w")
    (tmp_path / "mirror").mkdir()
    mounted = tmp_path / "mounted"
    (mounted / ".agent").mkdir(parents=True, mode=0o700)
    (mounted / ".agent" / "workspace.db").touch(mode=0o600)
    out = in_mount_namespace(
        [
            (tmp_path / "real", tmp_path / "mirror"),
            (real / ".agent" / "workspace.db", mounted / ".agent" / "workspace.db"),
        ],
        f"""
        from pathlib import Path
        from acode_sync.config import DaemonSettings
        from acode_sync.discovery import discover
        tmp = Path({str(tmp_path)!r})
        roots = (tmp / "real", tmp / "mirror", tmp)
        found = discover(DaemonSettings(roots=roots, max_depth=1), tmp)
        print(sorted(str(p.relative_to(tmp)) for p in found.workspaces))
        print({{str(p.relative_to(tmp)): e.message for p, e in found.refused.items()}})
        """,
    )
    workspaces, refused = out.splitlines()
    assert workspaces in ("['real/w']", "['mirror/w']")
    assert refused == (
        f"{{'mounted': '{mounted}/.agent/workspace.db is a mount point (a second name)'}}"
    )


def test_a_file_mounted_while_the_syncer_runs_is_refused_at_its_next_lock(
    tmp_path: Path,
) -> None:
    """The mount table is read again only when it changes; a mount made between two turns
    is still seen at the next one, and its unmount too."""
    tmp_path = tmp_path.resolve()
    real = make_workspace(tmp_path / "real")
    other = make_workspace(tmp_path / "other")
    out = in_mount_namespace(
        [],
        f"""
        import subprocess
        from pathlib import Path
        from acode_sync.errors import WorkspaceOpenError
        from acode_sync.sync import SyncLock
        real, other = Path({str(real)!r}), Path({str(other)!r})
        def turn(workspace):
            lock = SyncLock(workspace)
            try:
                assert lock.try_acquire()
            except WorkspaceOpenError as error:
                return error.message
            lock.release()
            return "ok"
        database = "/.agent/workspace.db"
        print(turn(real), turn(other))
        subprocess.run(["mount", "--bind", str(real) + database, str(other) + database], check=True)
        print(turn(real), turn(other))
        subprocess.run(["umount", str(other) + database], check=True)
        print(turn(real), turn(other))
        """,
    )
    assert out.splitlines() == [
        "ok ok",
        f"ok {other}/.agent/workspace.db is a mount point (a second name)",
        "ok ok",
    ]


# A process that holds a workspace's sync lock until its standard input closes.
HOLDER: Final = """
import sys
from pathlib import Path
from acode_sync.sync import SyncLock
lock = SyncLock(Path(sys.argv[1]))
print("held" if lock.try_acquire() else "busy", flush=True)
sys.stdin.read()
"""


def alias(kind: str, workspace: Path, tmp_path: Path) -> Path:
    """Another path to `workspace`'s database."""
    if kind == "parent link":
        (tmp_path / "via").symlink_to(workspace.parent)
        return tmp_path / "via" / workspace.name
    other = tmp_path / "other"
    if kind == ".agent link":
        other.mkdir()
        (other / ".agent").symlink_to(workspace / ".agent")
    elif kind == "database link":
        (other / ".agent").mkdir(parents=True, mode=0o700)
        (other / ".agent" / "workspace.db").symlink_to(workspace / ".agent" / "workspace.db")
    else:
        (other / ".agent").mkdir(parents=True, mode=0o700)
        os.link(workspace / ".agent" / "workspace.db", other / ".agent" / "workspace.db")
    return other


@pytest.mark.postgres
@pytest.mark.processes
@pytest.mark.parametrize(
    ("kind", "code"),
    [
        ("parent link", "ACODE-DB-004"),
        (".agent link", "ACODE-DB-001"),
        ("database link", "ACODE-DB-001"),
        ("hard link", "ACODE-DB-001"),
    ],
)
def test_a_second_syncer_by_another_path_does_not_sync(
    tmp_path: Path,
    pg_url: str,
    kind: str,
    code: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another process holds the lock by the workspace's own path; this process's
    `acode db sync` reaches the same database by another path."""
    workspace = make_workspace(tmp_path / "real" / "w", sessions=3)
    monkeypatch.setenv("ACODE_POSTGRES_URL", pg_url)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-config"))
    monkeypatch.setattr("acode_sync.cli.SYNC_LOCK_WAIT", 0.3)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(workspace)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(PYTHONPATH=os.pathsep.join([str(SRC / "src"), str(SRC)])),
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "held\n"
        second = alias(kind, workspace, tmp_path)
        before = contents(workspace / ".agent")
        returned = acode_main(["db", "sync", "--workspace", str(second)])
    finally:
        holder.communicate("")
    out, err = capsys.readouterr()
    assert returned == 1, out
    assert err.startswith(code), err
    assert out == ""
    assert contents(workspace / ".agent") == before  # nothing marked, nothing shipped


def test_the_status_file_is_private_and_never_written_through_a_link(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    secret = tmp_path / "secret"
    secret.write_text("keep me")
    # The old writer's predictable temporary name, planted as a link.
    (state / f".{STATUS_NAME}.{os.getpid()}").symlink_to(secret)
    old_umask = os.umask(0o022)
    try:
        write_status(state, {"pid": os.getpid()})
    finally:
        os.umask(old_umask)
    status = state / STATUS_NAME
    assert stat.S_IMODE(status.lstat().st_mode) == 0o600
    assert status.read_text().startswith("{")
    assert secret.read_text() == "keep me"
    assert sorted(p.name for p in state.iterdir()) == [f".{STATUS_NAME}.{os.getpid()}", STATUS_NAME]

    status.unlink()
    status.symlink_to(secret)
    with pytest.raises(OSError, match="is a symbolic link: not replacing it"):
        write_status(state, {"pid": os.getpid()})
    assert status.is_symlink()
    assert secret.read_text() == "keep me"
    assert sorted(p.name for p in state.iterdir()) == [f".{STATUS_NAME}.{os.getpid()}", STATUS_NAME]


def test_a_failed_status_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with pytest.raises(TypeError):
        write_status(state, {"not json": object()})
    assert list(state.iterdir()) == []


def test_check_workspace_files_names_what_is_not_a_file(tmp_path: Path) -> None:
    workspace = tmp_path / "w"
    workspace.mkdir()
    with pytest.raises(WorkspaceOpenError, match="no workspace database"):
        check_workspace_files(workspace)
    (workspace / ".agent").write_text("a file")
    with pytest.raises(WorkspaceOpenError, match="is not a directory"):
        check_workspace_files(workspace)
    with pytest.raises(WorkspaceOpenError, match="is a symbolic link or not a directory"):
        WorkspaceDatabase(workspace)
    (workspace / ".agent").unlink()
    (workspace / ".agent").mkdir()
    with pytest.raises(WorkspaceOpenError, match="no workspace database"):
        check_workspace_files(workspace)
    (workspace / ".agent" / "workspace.db").mkdir()
    with pytest.raises(WorkspaceOpenError, match=r"workspace\.db is not a regular file"):
        check_workspace_files(workspace)
    (workspace / ".agent" / "workspace.db").rmdir()
    (workspace / ".agent" / "workspace.db").touch()
    (workspace / ".agent" / "workspace.db-wal").mkdir()
    with pytest.raises(WorkspaceOpenError, match="-wal is not a regular file"):
        check_workspace_files(workspace)
