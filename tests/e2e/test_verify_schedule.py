"""The daemon's scheduled verify, in a real acode-syncd against the real PostgreSQL: no
false alarm while an agent writes and the daemon ships, a row deleted behind the daemon's
back named in the log and the metrics, and repaired only when verify_repair is on."""

from __future__ import annotations

import signal
import threading
import time
from datetime import datetime, timedelta

import pytest

from acode_sync.domain import Session
from acode_sync.store import WorkspaceDatabase
from tests.daemon_harness import pg_execute, pg_fetchval, sample, seed_sessions, wait_until
from tests.e2e.test_daemon import Rig, rig

pytestmark = [pytest.mark.postgres, pytest.mark.processes]
__all__ = ["rig"]

SESSIONS = 2000
INTERVAL_HOURS = 0.0005  # a slot every 1.8 s


def window_around_now() -> str:
    now = datetime.now()
    return f"{now - timedelta(hours=1):%H:%M}-{now + timedelta(hours=1):%H:%M}"


def central_ids(url: str) -> set[str]:
    text = pg_fetchval(url, "SELECT string_agg(session_id, ' ') FROM sessions")
    return set(str(text or "").split())


def test_scheduled_verify_no_false_alarm_then_names_a_deleted_row_then_repairs(
    rig: Rig,
) -> None:
    workspace = rig.root / "w"
    seed_sessions(workspace, SESSIONS)
    db = WorkspaceDatabase(workspace)
    ids = [str(row[0]) for row in db.conn.execute("SELECT session_id FROM sessions")]
    db.close()
    daemon_settings = {
        "verify_interval_hours": INTERVAL_HOURS,
        "verify_window": window_around_now(),
    }
    config = rig.config(daemon=daemon_settings)
    daemon, _ = rig.start_ready(config)
    rig.wait_sessions(SESSIONS)
    label = str(workspace)

    def runs(result: str) -> float:
        return sample(rig.metrics(), "acode_sync_verify_runs_total", result=result) or 0.0

    # An agent saves all the while: versions in flight during every verify.
    stop = threading.Event()
    saves = 0

    def agent() -> None:
        nonlocal saves
        store = WorkspaceDatabase(workspace)
        try:
            while not stop.is_set():
                store.save(Session(session_id=ids[saves % 50], title=f"moving {saves}"))
                store.save(Session(title=f"new {saves}"))
                saves += 1
        finally:
            store.close()

    writer = threading.Thread(target=agent)
    before = runs("ok")
    writer.start()
    try:
        wait_until(lambda: runs("ok") >= before + 4, "four verifies while the agent writes")
    finally:
        stop.set()
        writer.join(30)
    assert saves > 50
    # The verifies ran while versions were in flight (left out, not reported).
    assert any(e["in_flight"] > 0 for e in daemon.find("verify ok"))
    assert runs("mismatch") == 0
    assert runs("error") == 0
    assert not daemon.find("verify found differences")
    text = rig.metrics()
    for kind in ("missing", "stale", "digest_differs", "newer_centrally", "dead_letter"):
        assert sample(text, "acode_sync_verify_mismatches", workspace=label, kind=kind) == 0
    last = sample(text, "acode_sync_verify_last_success_timestamp_seconds", workspace=label)
    assert last is not None
    assert abs(time.time() - last) < 10
    assert sample(text, "acode_sync_verify_interval_seconds") == pytest.approx(1.8)

    # A row deleted behind the daemon's back (as a central restore from an older backup).
    gone = ids[-1]
    pg_execute(rig.pg_url, f"DELETE FROM acode.sessions WHERE session_id = '{gone}'")
    wait_until(
        lambda: (
            sample(rig.metrics(), "acode_sync_verify_mismatches", workspace=label, kind="missing")
            == 1
        ),
        "the missing row in acode_sync_verify_mismatches",
    )
    found = daemon.wait_log("verify found differences", workspace=label)
    assert found["differences"] == {"missing": 1}
    assert [line for line in found["listed"] if gone in line] == found["listed"]
    assert found["queued"] == 0
    assert found["level"] == "warning"
    # Read-only by default: later verifies still find it missing.
    mismatches = runs("mismatch")
    wait_until(lambda: runs("mismatch") >= mismatches + 2, "two more verifies")
    assert gone not in central_ids(rig.pg_url)

    # verify_repair on, by a reload: the next verify queues it and the daemon ships it.
    rig.write(rig.config(daemon={**daemon_settings, "verify_repair": True}))
    daemon.signal(signal.SIGHUP)
    daemon.wait_log("configuration reloaded")
    wait_until(lambda: gone in central_ids(rig.pg_url), "the repaired row in PostgreSQL")
    assert [e["queued"] for e in daemon.find("verify found differences")][-1] == 1
    wait_until(
        lambda: (
            sample(rig.metrics(), "acode_sync_verify_mismatches", workspace=label, kind="missing")
            == 0
        ),
        "no missing row after the repair",
    )
    assert rig.stop(daemon) == 0
    daemon.assert_no_traceback()
