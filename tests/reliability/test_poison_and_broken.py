"""Scenarios 3 and 4: poison records with the daemon running (each dead after exactly
max_attempts, the others unaffected, replay works), and broken workspaces (corrupt,
read-only, on a full file system) beside healthy ones."""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest

from acode_sync.domain import Session, format_timestamp, new_id, utc_now
from acode_sync.errors import AcodeError
from acode_sync.store import WorkspaceDatabase, encode_json
from acode_sync.workspace import database_path
from tests.daemon_harness import (
    ACODE,
    records_applied,
    run_cli,
    sample,
    scrape,
    wait_until,
    write_config,
)
from tests.reliability.rig import Rig, assert_clean, outbox_states, rig, summarise

pytestmark = [
    pytest.mark.reliability,
    pytest.mark.postgres,
    pytest.mark.processes,
    pytest.mark.timeout(600),
]
__all__ = ["rig"]

MAX_ATTEMPTS: Final = 10
ENTITY_TABLES: Final = (
    "sessions",
    "session_events",
    "session_tasks",
    "steps",
    "tool_calls",
    "artifacts",
)


def _insert_raw(workspace: Path, key: str, entity_type: str, entity_id: str, payload: str) -> None:
    """The plain-INSERT contract's outbox INSERT, with whatever payload the test wants."""
    conn = sqlite3.connect(database_path(workspace), isolation_level=None, timeout=30)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT INTO outbox (idempotency_key, entity_type, entity_id, session_id, payload,"
            " created_at) VALUES (?, ?, ?, ?, ?, ?)",
            (key, entity_type, entity_id, None, payload, format_timestamp(utc_now())),
        )
        conn.execute("COMMIT")
    finally:
        conn.close()


def _ledger_line(ledger: Path, saved: Session, origin: str) -> None:
    assert saved.updated_at is not None
    line = {
        "key": f"Session:{saved.session_id}:{saved.updated_at}",
        "entity_type": "Session",
        "entity_id": saved.session_id,
        "updated_at": saved.updated_at,
        "origin": origin,
        "digest": hashlib.sha256(encode_json(saved.row()).encode()).hexdigest(),
        "check_column": "title",
        "check_value": saved.title,
    }
    with ledger.open("a") as out:
        out.write(json.dumps(line) + "\n")


def _outbox(workspace: Path) -> dict[str, tuple[int, str, int, str | None]]:
    conn = sqlite3.connect(database_path(workspace))
    try:
        return {
            str(key): (int(i), str(state), int(attempts), last_error)
            for i, key, state, attempts, last_error in conn.execute(
                "SELECT outbox_id, idempotency_key, state, attempts, last_error FROM outbox"
            )
        }
    finally:
        conn.close()


def _error_rows(workspace: Path, outbox_id: int) -> int:
    conn = sqlite3.connect(database_path(workspace))
    try:
        (count,) = conn.execute(
            "SELECT count(*) FROM outbox_errors WHERE outbox_id = ?", (outbox_id,)
        ).fetchone()
        return int(count)
    finally:
        conn.close()


def test_poison_records_die_after_exactly_max_attempts_and_replay_works(rig: Rig) -> None:
    workspace = rig.workspace("poisoned")
    healthy = rig.workspace("healthy")
    rig.loadgen([workspace, healthy], "--records", "80").check_ok()
    ledger = rig.tmp_path / "ledger-poison.jsonl"
    rig.extra_ledgers.append(ledger)
    db = WorkspaceDatabase(workspace)
    try:
        nul = db.save(Session(title="nul \x00 inside"))
        huge = db.save(Session(title="x" * 20_000))
        for saved in (nul, huge):
            _ledger_line(ledger, saved, db.origin_id)
        # A later version of the oversized session waits behind it (order within an entity).
        stamp = format_timestamp(utc_now())
        widget = new_id("wid")
        _insert_raw(workspace, f"Widget:{widget}:{stamp}", "Widget", widget, '{"a": 1}')
        bad_id = new_id("art")
        _insert_raw(workspace, f"Artifact:{bad_id}:{stamp}", "Artifact", bad_id, "{not json")
    finally:
        db.close()
    poison = {
        "NUL in text": f"Session:{nul.session_id}:{nul.updated_at}",
        "oversized payload": f"Session:{huge.session_id}:{huge.updated_at}",
        "unknown entity type": f"Widget:{widget}:{stamp}",
        "invalid JSON": f"Artifact:{bad_id}:{stamp}",
    }

    config = rig.config(
        sync={
            "retry_base_seconds": 0.01,
            "retry_cap_seconds": 0.05,
            "max_payload_bytes": 8192,
            "max_attempts": MAX_ATTEMPTS,
        }
    )
    daemon = rig.start_daemon(config)

    def all_dead() -> bool:
        rows = _outbox(workspace)
        return all(rows[key][1] == "dead" for key in poison.values())

    wait_until(all_dead, "every poison record dead", timeout=120)
    rig.wait_drained()
    rows = _outbox(workspace)
    for kind, key in poison.items():
        outbox_id, state, attempts, last_error = rows[key]
        assert (state, attempts) == ("dead", MAX_ATTEMPTS), kind
        assert _error_rows(workspace, outbox_id) == MAX_ATTEMPTS, kind
        assert last_error, kind
        assert len(daemon.find("dead letter", idempotency_key=key)) == 1, kind
    assert "22P05" in str(rows[poison["NUL in text"]][3])  # untranslatable \u0000
    assert "22P02" in str(rows[poison["invalid JSON"]][3])
    assert "max_payload_bytes" in str(rows[poison["oversized payload"]][3])
    assert "unknown entity type" in str(rows[poison["unknown entity type"]][3])
    others = {k: r for k, r in rows.items() if k not in poison.values()}
    assert {(r[1], r[2]) for r in others.values()} == {("processed", 0)}
    assert outbox_states(healthy) == {"processed": sum(outbox_states(healthy).values())}

    # Replay: allow bigger payloads (SIGHUP), then `acode db outbox retry ID`.
    config["sync"]["max_payload_bytes"] = 1 << 20
    write_config(rig.config_path, config)
    daemon.signal(signal.SIGHUP)
    daemon.wait_log("configuration reloaded")
    huge_id = rows[poison["oversized payload"]][0]
    result = run_cli(ACODE, "db", "outbox", "retry", str(huge_id), "--workspace", str(workspace))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "1 record(s) queued again\n"
    wait_until(lambda: _outbox(workspace)[poison["oversized payload"]][1] == "processed", "replay")
    rig.stop_daemon(daemon)
    report = rig.check()
    summarise("poison records (4 kinds), replay", report, runs=1)
    assert_clean(report)
    assert report.dead == 1  # the NUL session (the other two dead ones are unledgered)
    assert sorted(report.unledgered) == sorted(
        [poison["unknown entity type"], poison["invalid JSON"]]
    )
    daemon.assert_no_traceback()
    rig.assert_no_secret()


# --------------------------------------------------------------------------- 4


def _rows(workspace: Path) -> tuple[int, int, int]:
    """(entity rows, entities named by the outbox, outbox rows), read without writing
    anything (the file system may be read-only or full: `immutable=1` needs no -shm)."""
    uri = f"file:{database_path(workspace)}?immutable=1"
    conn = sqlite3.connect(uri, uri=True)
    try:
        entities = sum(
            int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
            for table in ENTITY_TABLES
        )
        (named,) = conn.execute(
            "SELECT count(*) FROM (SELECT DISTINCT entity_type, entity_id FROM outbox)"
        ).fetchone()
        (records,) = conn.execute("SELECT count(*) FROM outbox").fetchone()
        return entities, int(named), int(records)
    finally:
        conn.close()


def _root_mount(*argv: str) -> bool:
    try:
        done = subprocess.run(["mount", *argv], capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30, check=False)


@contextlib.contextmanager
def _mounts() -> Iterator[list[Path]]:
    mounted: list[Path] = []
    try:
        yield mounted
    finally:
        for path in reversed(mounted):
            _umount(path)


def _save_fails(workspace: Path) -> str:
    """A writer's save on a broken workspace: the ACODE-DB code it gets."""
    try:
        db = WorkspaceDatabase(workspace)
    except AcodeError as error:
        return error.code
    try:
        db.save(Session(title="refused"))
    except AcodeError as error:
        return error.code
    finally:
        db.close()
    raise AssertionError(f"a save into {workspace} succeeded")


def _broken(rig: Rig, daemon: Any, workspace: Path) -> str:
    event = daemon.wait_log("workspace broken", workspace=str(workspace), timeout=60)
    code = str(event["code"])
    assert code.startswith("ACODE-DB-")

    def metric() -> bool:
        text = scrape(rig.port)
        rig.metrics_seen.append(text)
        one = sample(text, "acode_sync_workspace_broken", workspace=str(workspace), code=code)
        count = sample(text, "acode_sync_workspaces_broken", code=code)
        return one == 1 and count is not None and count >= 1

    wait_until(metric, f"{workspace.name} broken in /metrics")
    return code


def test_corrupt_read_only_and_full_workspaces_beside_healthy_ones(rig: Rig) -> None:
    healthy = [rig.workspace(f"ok{n}") for n in range(3)]
    readonly, full = rig.workspace("readonly"), rig.workspace("full")
    corrupt = rig.root / "corrupt"
    (corrupt / ".agent").mkdir(parents=True, mode=0o700)
    database_path(corrupt).write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 64)

    with _mounts() as mounted:
        full.mkdir()
        can_tmpfs = _root_mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(full))
        if can_tmpfs:
            mounted.append(full)
        rig.loadgen([readonly, full], "--records", "40").check_ok()
        filler = full / "filler"
        if can_tmpfs:
            with contextlib.suppress(OSError), filler.open("wb") as out:
                while True:
                    out.write(b"\0" * 65536)
                    out.flush()
        can_bind = _root_mount("--bind", str(readonly), str(readonly))
        if can_bind:
            mounted.append(readonly)
            can_bind = _root_mount("-o", "remount,ro,bind", str(readonly))
        if not (can_tmpfs and can_bind):
            pytest.skip("mount is not permitted here (needs root): no read-only/full workspace")
        before = {w: _rows(w) for w in (readonly, full)}

        stop = rig.tmp_path / "stop"
        rig.loadgen(healthy, "--stop-file", str(stop), "--pause", "0.01")
        daemon = rig.start_daemon()
        codes = {w.name: _broken(rig, daemon, w) for w in (corrupt, readonly, full)}
        writer_codes = {w.name: _save_fails(w) for w in (corrupt, readonly, full)}
        for workspace, counts in before.items():  # nothing half-written
            assert _rows(workspace) == counts
            assert counts[0] == counts[1]  # every row has its records, every record its row
        wait_until(lambda: records_applied(rig.port), "the healthy workspaces syncing")
        stop.touch()
        rig.loadgens[-1].check_ok()
        rig.wait_drained(healthy)  # the others kept syncing

        # Repaired: space freed, the mount writable again: both recover and drain.
        filler.unlink()
        _umount(readonly)
        mounted.remove(readonly)
        for workspace in (readonly, full):
            daemon.wait_log("workspace recovered", workspace=str(workspace), timeout=60)
        rig.wait_drained()
        rig.stop_daemon(daemon)
        report = rig.check()
    summarise("corrupt / read-only / full-disk workspaces", report, runs=1)
    print("daemon codes", codes, "writer codes", writer_codes)
    assert set(writer_codes.values()) <= {"ACODE-DB-001", "ACODE-DB-003"}
    assert_clean(report)
    daemon.assert_no_traceback()
    rig.assert_no_secret()
