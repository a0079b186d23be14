"""The central copy as a backup, end to end: `acode db verify` and `acode db flush` as
child processes against the real PostgreSQL (dumped, dropped and restored with its own
tools), the real daemon, real workspace files."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote, urlsplit

import pytest

from acode_sync.domain import Session, SessionEvent
from acode_sync.store import WorkspaceDatabase
from acode_sync.sync import SyncLock
from acode_sync.workspace import database_path
from tests.daemon_harness import (
    ACODE,
    DaemonProcess,
    NotifySocket,
    child_env,
    daemon_config,
    free_port,
    outbox_counts,
    pg_count,
    pg_fetchval,
    run_cli,
    save_sessions,
    seed_sessions,
    wait_until,
    write_config,
)
from tests.pg import drop_database

pytestmark = [pytest.mark.postgres, pytest.mark.processes]

PASSWORD: Final = "Flush/Pa55#word@x"
TABLES: Final = ("sessions", "session_events")


def acode(*argv: str, url: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run_cli(ACODE, "db", *argv, env=child_env(ACODE_POSTGRES_URL=url, **env))


def write(workspace: Path, *, new: int, update: list[str]) -> dict[str, set[str]]:
    """New sessions (each with an event) and new versions of existing ones; the ids."""
    db = WorkspaceDatabase(workspace)
    try:
        sessions = [db.save(Session(title="new")) for _ in range(new)]
        events = [db.save(SessionEvent(session_id=s.session_id, event_type="x")) for s in sessions]
        for session_id in update:
            db.save(Session(session_id=session_id, title="updated"))
    finally:
        db.close()
    return {
        "missing": {s.session_id for s in sessions} | {e.event_id for e in events},
        "stale": set(update),
    }


def differences(report: dict[str, Any]) -> dict[str, set[str]]:
    return {
        kind: {d["entity_id"] for d in found}
        for kind, found in report["differences"].items()
        if found
    }


def verify_json(workspace: Path, url: str, *extra: str) -> tuple[int, dict[str, Any]]:
    done = acode("verify", "--workspace", str(workspace), "--json", *extra, url=url)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, json.loads(done.stdout)


def flushed(workspace: Path, url: str) -> str:
    done = acode("flush", "--workspace", str(workspace), "--timeout", "60", url=url)
    assert done.returncode == 0, done.stderr
    return done.stdout


def pg_tool(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=120)


def test_central_restored_from_a_dump_verify_names_the_gap_and_repair_ships_it(
    tmp_path: Path, pg_url: str
) -> None:
    workspaces = [tmp_path / "agent-a", tmp_path / "agent-b"]
    before: dict[Path, list[str]] = {}
    for n, workspace in enumerate(workspaces):
        before[workspace] = save_sessions(workspace, 6 + n)
        write(workspace, new=2, update=before[workspace][:2])
        flushed(workspace, pg_url)
        code, report = verify_json(workspace, pg_url)
        assert (code, report["ok"]) == (0, True), report

    dump = tmp_path / "central.dump"
    pg_tool("pg_dump", "--format=custom", f"--file={dump}", f"--dbname={pg_url}")

    lacking = {}
    for workspace in workspaces:
        lacking[workspace] = write(workspace, new=3, update=before[workspace][2:4])
        flushed(workspace, pg_url)

    name = urlsplit(pg_url).path.lstrip("/")
    drop_database(name)
    pg_tool(
        "psql", f"--dbname={pg_url.rsplit('/', 1)[0]}/postgres", "-c", f'CREATE DATABASE "{name}"'
    )
    pg_tool("pg_restore", "--no-owner", f"--dbname={pg_url}", str(dump))

    for workspace in workspaces:
        code, report = verify_json(workspace, pg_url)
        assert code == 1
        assert not report["ok"]
        assert differences(report) == lacking[workspace]
        assert report["in_flight"] == 0
        code, report = verify_json(workspace, pg_url, "--repair")
        assert code == 1
        assert report["queued"] == len(set().union(*lacking[workspace].values()))
        flushed(workspace, pg_url)
        code, report = verify_json(workspace, pg_url)
        assert (code, differences(report)) == (0, {})

    # PostgreSQL now holds every row of both workspaces, nothing else, at their versions.
    for table, id_column in (("sessions", "session_id"), ("session_events", "event_id")):
        local: set[tuple[str, str]] = set()
        for workspace in workspaces:
            db = WorkspaceDatabase(workspace)
            local |= set(db.conn.execute(f"SELECT {id_column}, updated_at FROM {table}"))
            db.close()
        central = pg_fetchval(
            pg_url,
            f"SELECT json_agg(json_build_array({id_column}, "
            f"to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'))) "
            f"FROM {table}",
        )
        assert {tuple(pair) for pair in json.loads(central)} == local


# --------------------------------------------------------------------------- flush


def seeded(tmp_path: Path, count: int) -> Path:
    workspace = tmp_path / "root" / "agent"
    seed_sessions(workspace, count)
    return workspace


def test_flush_without_a_daemon_ships_the_records_itself(tmp_path: Path, pg_url: str) -> None:
    workspace = seeded(tmp_path, 1500)
    out = flushed(workspace, pg_url)
    assert "shipped by this command" in out
    assert pg_count(pg_url, "sessions") == 1500
    assert outbox_counts(workspace) == {"processed": 1500}
    assert flushed(workspace, pg_url).startswith("flushed: every record up to outbox id 1500")


def test_flush_with_the_daemon_running(tmp_path: Path, pg_url: str) -> None:
    tmp_path = tmp_path.resolve()
    workspace = seeded(tmp_path, 1)
    config = write_config(
        tmp_path / "acode-syncd.toml",
        daemon_config(
            dsn=pg_url,
            roots=[tmp_path / "root"],
            state_dir=tmp_path / "state",
            metrics_port=free_port(),
        ),
    )
    with NotifySocket() as notify:
        daemon = DaemonProcess.start(config, notify=notify, workdir=tmp_path)
        try:
            notify.wait_for("READY=1")
            wait_until(lambda: pg_count(pg_url, "sessions") == 1, "the daemon's first sync")
            seed_sessions(workspace, 8000)  # a write: the daemon wakes and drains
            out = flushed(workspace, pg_url)
            # When flush returns, every record it was asked for is in PostgreSQL, whoever
            # shipped it (the daemon holds the lock while it drains; flush ships between).
            assert pg_count(pg_url, "sessions") >= 8001, out
            assert outbox_counts(workspace) == {"processed": 8001}
            assert daemon.running()
            daemon.assert_no_traceback()
        finally:
            daemon.close()


def test_flush_waits_while_another_syncer_holds_the_workspace(tmp_path: Path, pg_url: str) -> None:
    workspace = seeded(tmp_path, 20)
    lock = SyncLock(workspace)
    assert lock.try_acquire()
    try:
        done = acode("flush", "--workspace", str(workspace), "--timeout", "1", url=pg_url)
        assert done.returncode == 1
        assert done.stderr.startswith(
            "ACODE-DB-004: flush timed out after 1 s: 20 record(s) still pending; another "
            "syncer (the daemon?) holds the workspace's sync lock and is still shipping them\n"
        )
        env = child_env(ACODE_POSTGRES_URL=pg_url)
        waiting = subprocess.Popen(
            [ACODE, "db", "flush", "--workspace", str(workspace), "--timeout", "60"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(1.5)
        assert waiting.poll() is None  # still waiting for the lock's holder
        assert pg_count(pg_url, "sessions") == 0
    finally:
        lock.release()
    _out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0, err
    assert pg_count(pg_url, "sessions") == 20


def test_flush_with_postgres_down_times_out_with_the_pending_count(tmp_path: Path) -> None:
    workspace = seeded(tmp_path, 12)
    down = f"postgresql://postgres:{quote(PASSWORD, safe='')}@127.0.0.1:{free_port()}/acode"
    started = time.monotonic()
    done = acode("flush", "--workspace", str(workspace), "--timeout", "2", url=down)
    assert time.monotonic() - started < 30
    assert done.returncode == 1
    assert done.stderr.splitlines()[-2].startswith(
        "ACODE-DB-005: flush timed out after 2 s: 12 record(s) still pending; PostgreSQL at "
        "127.0.0.1:"
    )
    assert "hint: " in done.stderr
    assert "Traceback" not in done.stderr
    assert PASSWORD not in done.stdout + done.stderr
    assert "Pa55" not in done.stdout + done.stderr
    assert outbox_counts(workspace) == {"pending": 12}  # nothing lost, nothing charged


def test_flush_reports_dead_letters(tmp_path: Path, pg_url: str) -> None:
    workspace = seeded(tmp_path, 3)
    db = WorkspaceDatabase(workspace)
    db.conn.execute("UPDATE outbox SET state = 'dead' WHERE outbox_id = 2")
    db.close()
    done = acode("flush", "--workspace", str(workspace), url=pg_url)
    assert done.returncode == 1
    assert done.stderr.startswith(
        "ACODE-DB-006: 1 record(s) committed before the flush are dead letters"
    )
    assert "acode db outbox retry" in done.stderr
    assert database_path(workspace).exists()
