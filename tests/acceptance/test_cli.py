from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from acode_sync import __version__, daemon_cli
from acode_sync.cli import main
from acode_sync.domain import Session
from acode_sync.migrations import latest_version, load_migrations
from acode_sync.store import WorkspaceDatabase
from acode_sync.workspace import DIALECT, database_path
from tests.daemon_harness import render_toml
from tests.integration.test_outbox_migration import version_1_workspace

LATEST = latest_version(load_migrations(DIALECT))


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_migrate_creates_then_reports_no_change(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(capsys, "db", "migrate", "--workspace", str(workspace)) == (
        0,
        f"schema version 0 -> {LATEST}\n",
        "",
    )
    assert run_cli(capsys, "db", "migrate", "--workspace", str(workspace))[1] == (
        f"schema version {LATEST} -> {LATEST}\n"
    )
    assert run_cli(capsys, "db", "schema", "version", "--workspace", str(workspace))[1] == (
        f"{LATEST}\n"
    )


def test_status_reports_counts_and_backlog(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = WorkspaceDatabase(workspace)
    session = db.save(Session())
    db.save(Session(session_id=session.session_id, title="renamed"))
    db.conn.execute(
        "UPDATE outbox SET state = 'dead' WHERE outbox_id = (SELECT min(outbox_id) FROM outbox)"
    )
    db.close()

    code, out, _ = run_cli(capsys, "db", "status", "--workspace", str(workspace), "--json")
    status = json.loads(out)
    assert code == 0
    assert status["schema_version"] == status["latest_schema_version"] == LATEST
    assert status["journal_mode"] == "wal"
    assert status["file_mode"] == "0600"
    assert status["rows"]["sessions"] == 1
    assert status["rows"]["outbox"] == 2
    assert (status["outbox_pending"], status["outbox_dead"], status["outbox_processed"]) == (
        1,
        1,
        0,
    )
    assert status["oldest_pending_age_seconds"] >= 0
    assert status["origin_id"] == db.origin_id

    code, out, _ = run_cli(capsys, "db", "status", "--workspace", str(workspace))
    assert code == 0
    assert "1 pending, 1 failed, 0 processed" in out
    assert "journal mode:    wal" in out


def test_status_of_an_empty_outbox_says_none(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    WorkspaceDatabase(workspace).close()
    _, out, _ = run_cli(capsys, "db", "status", "--workspace", str(workspace))
    assert "oldest pending:  none" in out


def test_status_does_not_create_a_workspace(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(capsys, "db", "status", "--workspace", str(workspace))
    assert code == 1
    assert out == ""
    assert err.startswith("ACODE-DB-001: no workspace database at ")
    assert "hint: Run `acode db migrate`" in err
    assert not (workspace / ".agent").exists()


def test_newer_schema_is_refused_with_its_code(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    WorkspaceDatabase(workspace).close()
    conn = sqlite3.connect(database_path(workspace))
    conn.execute(
        "INSERT INTO schema_migrations (version, name, checksum, created_at) "
        "VALUES (99, 'future', 'x', '2030-01-01T00:00:00.000000Z')"
    )
    conn.commit()
    conn.close()
    for argv in (["db", "migrate"], ["db", "status"], ["db", "schema", "version"]):
        code, _, err = run_cli(capsys, *argv, "--workspace", str(workspace))
        assert code == 1
        assert err.startswith("ACODE-DB-003: schema version 99 is newer than this program")
        assert "Traceback" not in err


def test_status_of_an_older_schema_says_how_to_upgrade(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    version_1_workspace(workspace).close()
    code, out, err = run_cli(capsys, "db", "status", "--workspace", str(workspace))
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        f"ACODE-DB-003: {database_path(workspace)}: schema version 1, this program reports "
        f"on version {LATEST}",
        f"hint: Run `acode db migrate --workspace {workspace}` to upgrade it (opening it with "
        "the agent does too); status never migrates a workspace.",
    ]
    assert run_cli(capsys, "db", "schema", "version", "--workspace", str(workspace))[1] == "1\n"

    assert run_cli(capsys, "db", "migrate", "--workspace", str(workspace))[0] == 0
    code, out, _ = run_cli(capsys, "db", "status", "--workspace", str(workspace))
    assert code == 0
    assert f"schema version:  {LATEST} (latest {LATEST})" in out


@pytest.mark.processes
def test_console_scripts_run_as_processes(workspace: Path) -> None:
    bin_dir = Path(sys.executable).parent
    done = subprocess.run(
        [bin_dir / "acode", "db", "migrate"],
        cwd=workspace,
        capture_output=True,
        text=True,
        check=False,
    )
    assert (done.returncode, done.stdout) == (0, f"schema version 0 -> {LATEST}\n")
    assert database_path(workspace).exists()

    garbage = workspace / "other" / ".agent"
    garbage.mkdir(parents=True)
    (garbage / "workspace.db").write_text("not a database" * 100)
    done = subprocess.run(
        [bin_dir / "acode", "db", "status", "--workspace", str(garbage.parent)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("ACODE-DB-001:")
    assert "Traceback" not in done.stderr

    for script, name in (("acode", "acode"), ("acode-syncd", "acode-syncd")):
        done = subprocess.run(
            [bin_dir / script, "--version"], capture_output=True, text=True, check=True
        )
        assert done.stdout.strip() == f"{name} {__version__}"
    done = subprocess.run(
        [bin_dir / "acode-syncd", "--help"], capture_output=True, text=True, check=True
    )
    assert "usage: acode-syncd" in done.stdout


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("[sync]\nmax_attemps = 3\n", "hint: Did you mean sync.max_attempts?"),
        ("[sync\n", "hint: Fix the syntax at the line and column named above"),
        (None, "hint: Check the path given with --config or $ACODE_SYNC_CONFIG"),
    ],
)
def test_check_config_hints_at_the_fix_not_at_itself(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str | None, hint: str
) -> None:
    config = tmp_path / "acode-syncd.toml"
    if text is not None:
        config.write_text(text)
    assert daemon_cli.main(["check-config", "--config", str(config)]) == 78
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("ACODE-DB-007: ")
    assert err.splitlines()[1].startswith(hint)
    assert "check-config" not in err


@pytest.mark.processes
def test_check_config_shows_that_a_password_file_is_set_never_its_content(
    tmp_path: Path,
) -> None:
    secret = "pw-from-the-file-7f3a"
    password_file = tmp_path / "pg-password"
    password_file.write_text(secret + "\n")
    password_file.chmod(0o600)
    config = tmp_path / "acode-syncd.toml"
    config.write_text(f'[postgres]\npassword_file = "{password_file}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACODE_")}
    for argv, extra in (
        (["--config", str(config)], {}),
        ([], {"ACODE_POSTGRES_PASSWORD_FILE": str(password_file)}),
    ):
        done = subprocess.run(
            [Path(sys.executable).parent / "acode-syncd", "check-config", *argv],
            capture_output=True,
            text=True,
            check=False,
            env={**env, "XDG_CONFIG_HOME": str(tmp_path / "none"), **extra},
        )
        assert done.returncode == 0, done.stderr
        shown = json.loads(done.stdout)["postgres"]
        assert shown["password"] == "******** (from password_file)"
        assert shown["password_file"] == str(password_file)
        assert secret not in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("postgres", "named"),
    [
        (
            {"dsn": "postgresql://u:dsn-pw-5521@db/acode", "password": "toml-pw-5521"},
            "a password in postgres.dsn and postgres.password",
        ),
        (
            {"dsn": "postgresql://u@db/acode?password=dsn-pw-5521", "password_file": "/pw"},
            "a password in postgres.dsn and postgres.password_file",
        ),
        (
            {"password": "toml-pw-5521", "password_file": "/pw"},
            "postgres.password and postgres.password_file",
        ),
    ],
)
def test_check_config_refuses_a_password_given_twice_without_showing_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], postgres: dict[str, str], named: str
) -> None:
    config = tmp_path / "acode-syncd.toml"
    config.write_text(render_toml({"postgres": postgres}))
    assert daemon_cli.main(["check-config", "--config", str(config)]) == 78
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"ACODE-DB-007: [postgres] gives the password more than once: {named}")
    assert "hint: Keep one of them" in err
    assert "pw-5521" not in err
