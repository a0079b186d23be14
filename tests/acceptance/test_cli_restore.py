"""`acode db restore` as a command: in-process for its output, and as a real process
killed with SIGKILL halfway through."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import anyio
import pytest

from acode_sync.cli import main
from acode_sync.domain import Session
from acode_sync.store import WorkspaceDatabase
from acode_sync.sync import WorkspaceSyncer
from acode_sync.workspace import database_path
from tests.central import seed_central
from tests.daemon_harness import ACODE, child_env
from tests.records import run_sql

pytestmark = pytest.mark.postgres

PASSWORD = "s3cret-Pa55"


@pytest.fixture
def env(pg_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """The DSN with a password (the server trusts the test's connections anyway)."""
    parts = urlsplit(pg_url)
    url = urlunsplit(parts._replace(netloc=f"postgres:{PASSWORD}@{parts.hostname}:{parts.port}"))
    monkeypatch.setenv("ACODE_POSTGRES_URL", url)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-config"))
    monkeypatch.delenv("ACODE_SYNC_CONFIG", raising=False)
    return url


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert PASSWORD not in out + err
    return code, out, err


def test_restore_prints_counts_and_refuses_what_is_not_there(
    workspace: Path, tmp_path: Path, env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    db = WorkspaceDatabase(workspace)
    session = db.save(Session(title="lost laptop", metadata={"b": 1, "a": 2}))
    db.close()
    assert cli(capsys, "db", "sync", "--workspace", str(workspace))[0] == 0
    new = tmp_path / "new-laptop"
    new.mkdir()
    into = ["--workspace", str(new)]

    code, out, err = cli(capsys, "db", "restore", *into, "--session", session.session_id)
    assert code == 0
    assert "sessions        restored        1  verified        1" in out
    assert "total: 1 restored, 1 verified, 0 skipped" in out
    assert err == ""  # no progress line off a terminal

    code, out, _ = cli(capsys, "db", "restore", *into, "--all", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["tables"]["sessions"]["skipped_same"] == 1
    assert report["skipped_examples"] == [
        f"Session {session.session_id}: already at version {session.updated_at} locally"
    ]

    code, _, err = cli(capsys, "db", "restore", *into, "--session", "sess_nowhere")
    assert code == 1
    assert err.startswith("ACODE-DB-006: no session sess_nowhere in PostgreSQL\nhint: ")

    with pytest.raises(SystemExit):
        main(["db", "restore", *into])  # one of --session, --origin, --all
    capsys.readouterr()


def test_a_restore_killed_halfway_leaves_the_workspace_as_it_was(
    pg_url: str, tmp_path: Path
) -> None:
    entities = anyio.run(seed_central, pg_url, 10_000)
    workspace = tmp_path / "runner"
    workspace.mkdir()
    command = [ACODE, "db", "restore", "--workspace", str(workspace), "--all"]
    env = child_env(ACODE_POSTGRES_URL=pg_url, XDG_CONFIG_HOME=str(tmp_path / "none"))
    wal = Path(f"{database_path(workspace)}-wal")

    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        # The transaction spills pages into the WAL as it grows: well under way, not done.
        while not (wal.exists() and wal.stat().st_size > 4_000_000):
            assert child.poll() is None, "the restore ended before it was killed"
            assert time.monotonic() < deadline
            time.sleep(0.005)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL

    counts = run_sql(
        workspace,
        "SELECT (SELECT count(*) FROM sessions), "
        "(SELECT count(*) FROM session_events), (SELECT count(*) FROM outbox)",
    )
    assert counts == [(0, 0, 0)]

    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"total: {entities} restored, {entities} verified, 0 skipped" in done.stdout
    assert run_sql(workspace, "SELECT count(*) FROM session_events") == [(entities - 10_000,)]
    # A restored workspace has nothing to ship.
    syncer_backlog = anyio.run(_backlog, workspace)
    assert syncer_backlog == 0


async def _backlog(workspace: Path) -> int:
    from acode_sync.config import PostgresSettings
    from acode_sync.postgres import PostgresTarget

    target = PostgresTarget(PostgresSettings(dsn="postgresql://unused@127.0.0.1/none"))
    syncer = WorkspaceSyncer(workspace=workspace, target=target)
    try:
        return (await syncer.backlog())[0]
    finally:
        await syncer.release()
