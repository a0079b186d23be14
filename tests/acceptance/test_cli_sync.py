from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest

from acode_sync.cli import main
from acode_sync.domain import Session
from acode_sync.migrations import latest_version, load_migrations
from acode_sync.store import WorkspaceDatabase
from acode_sync.sync import SyncLock
from acode_sync.workspace import database_path

pytestmark = pytest.mark.postgres


@pytest.fixture
def env(pg_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    monkeypatch.setenv("ACODE_POSTGRES_URL", pg_url)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-config"))
    monkeypatch.delenv("ACODE_SYNC_CONFIG", raising=False)
    return pg_url


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def seed(workspace: Path) -> str:
    db = WorkspaceDatabase(workspace)
    session = db.save(Session(title="one"))
    db.save(Session(session_id=session.session_id, title="two"))
    db.conn.execute(
        "INSERT INTO outbox (idempotency_key, entity_type, entity_id, session_id, payload, "
        "created_at) VALUES ('Widget:w1:2026-01-01T00:00:00Z', 'Widget', 'w1', NULL, '{}', "
        "'2026-01-01T00:00:00Z')"
    )
    db.close()
    return session.session_id


def test_sync_outbox_and_conflicts_commands(
    workspace: Path, env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    seed(workspace)
    ws = ["--workspace", str(workspace)]

    code, out, err = cli(capsys, "db", "sync", *ws)
    assert code == 0
    assert out == "applied 2, duplicates 0, conflicts 0, retried 1, dead 0 (1 batches)\n"
    assert "Widget:w1:2026-01-01T00:00:00Z" in err  # the retry is logged with its key

    code, out, _ = cli(capsys, "db", "outbox", "list", *ws)
    assert code == 0
    assert "Widget:w1:2026-01-01T00:00:00Z" in out
    assert "unknown entity type" in out

    conn = sqlite3.connect(database_path(workspace))
    conn.execute("UPDATE outbox SET state = 'dead', attempts = 10 WHERE entity_type = 'Widget'")
    conn.commit()
    conn.close()
    code, out, _ = cli(capsys, "db", "outbox", "list", "--failed", "--json", *ws)
    failed = json.loads(out)
    assert [(r["idempotency_key"], r["state"], r["attempts"]) for r in failed] == [
        ("Widget:w1:2026-01-01T00:00:00Z", "dead", 10)
    ]

    code, out, _ = cli(capsys, "db", "outbox", "retry", "--all-failed", *ws)
    assert (code, out) == (0, "1 record(s) queued again\n")
    code, out, _ = cli(capsys, "db", "outbox", "list", "--json", *ws)
    assert [(r["state"], r["attempts"]) for r in json.loads(out)] == [("pending", 0)]
    code, out, _ = cli(capsys, "db", "outbox", "retry", str(failed[0]["outbox_id"]), *ws)
    assert out == "0 record(s) queued again\n"  # only dead records are replayed

    code, out, _ = cli(capsys, "db", "conflicts", "list", "--json")
    assert (code, json.loads(out)) == (0, [])
    code, out, _ = cli(capsys, "db", "conflicts", "list")
    assert (code, out) == (0, "")


def test_sync_once_ships_one_batch(
    workspace: Path, env: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    db = WorkspaceDatabase(workspace)
    for _ in range(5):
        db.save(Session())
    db.close()
    config = tmp_path / "acode-syncd.toml"
    config.write_text("[sync]\nbatch_max_records = 2\n")
    code, out, _ = cli(
        capsys, "db", "sync", "--once", "--config", str(config), "--workspace", str(workspace)
    )
    assert (code, out) == (
        0,
        "applied 2, duplicates 0, conflicts 0, retried 0, dead 0 (1 batches)\n",
    )


def test_retry_needs_ids_or_all_failed(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    WorkspaceDatabase(workspace).close()
    code, _, err = cli(capsys, "db", "outbox", "retry", "--workspace", str(workspace))
    assert code == 1
    assert err.startswith("ACODE-DB-006: give outbox ids or --all-failed")
    hint = err.splitlines()[-1]
    assert hint == (
        "hint: List the dead letters with `acode db outbox list --failed`, then replay them "
        "by id (`acode db outbox retry ID...`) or all at once (`--all-failed`)."
    )


def test_sync_beside_a_running_syncer_says_so(
    workspace: Path, env: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    WorkspaceDatabase(workspace).close()
    monkeypatch.setattr("acode_sync.cli.SYNC_LOCK_WAIT", 0.3)
    lock = SyncLock(workspace)
    assert lock.try_acquire()
    try:
        code, _, err = cli(capsys, "db", "sync", "--workspace", str(workspace))
    finally:
        lock.release()
    assert code == 1
    assert err.startswith("ACODE-DB-004: another syncer")


def test_sync_with_postgres_down_exits_with_005(
    workspace: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seed(workspace)
    monkeypatch.setenv("ACODE_POSTGRES_URL", "postgresql://postgres:Sekr1t-pw@127.0.0.1:9/x")
    code, out, err = cli(capsys, "db", "sync", "--workspace", str(workspace))
    assert code == 1
    assert out == ""
    assert err.startswith("ACODE-DB-005: PostgreSQL at 127.0.0.1:9/x")
    assert "Sekr1t-pw" not in err
    conn = sqlite3.connect(database_path(workspace))
    assert conn.execute("SELECT max(attempts) FROM outbox").fetchone() == (0,)
    conn.close()


def test_migrate_postgres(env: str, capsys: pytest.CaptureFixture[str]) -> None:
    latest = latest_version(load_migrations("postgres"))
    first = cli(capsys, "db", "migrate", "--postgres")[1]
    assert first == f"PostgreSQL schema version 0 -> {latest}\n"
    again = cli(capsys, "db", "migrate", "--postgres")[1]
    assert again == f"PostgreSQL schema version {latest} -> {latest}\n"


def test_conflicts_list_json_prints_canonical_times_and_versions_as_objects(
    tmp_path: Path, env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """What docs/cli.md says `conflicts list --json` prints, from a real conflict."""
    older, newer = tmp_path / "older", tmp_path / "newer"
    older.mkdir()
    newer.mkdir()
    for workspace, title in ((older, "older"), (newer, "newer")):
        db = WorkspaceDatabase(workspace)
        if workspace == older:
            session_id = db.save(Session(title=title)).session_id
        else:
            db.save(Session(session_id=session_id, title=title))
        db.close()
    for workspace in (newer, older):  # the older version arrives second: a conflict
        assert cli(capsys, "db", "sync", "--workspace", str(workspace))[0] == 0

    code, out, _ = cli(capsys, "db", "conflicts", "list", "--json")
    assert code == 0
    (conflict,) = json.loads(out)
    assert conflict["winner"] == "current"
    for key in ("incoming_updated_at", "current_updated_at", "detected_at"):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", conflict[key]), key
    assert conflict["incoming_version"]["title"] == "older"
    assert conflict["current_version"]["title"] == "newer"
    assert conflict["incoming_key"].startswith(f"Session:{session_id}:")
