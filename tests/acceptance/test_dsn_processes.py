"""The DSN as the commands see it, run as real processes: a bad one stops every entry
point with ACODE-DB-007 and exit 78, and no password ever reaches their output."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from urllib.parse import quote, unquote

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from acode_sync.domain import Session
from acode_sync.store import WorkspaceDatabase
from tests.daemon_harness import ACODE, SYNCD, child_env, run_cli, write_config

pytestmark = pytest.mark.processes

MALFORMED = "postgresql://u@[127.0.0.1/x"
PASSWORDS = st.text(
    st.one_of(st.sampled_from("/#?@:[]%"), st.characters(blacklist_categories=("Cs", "Cc"))),
    min_size=8,
    max_size=16,
)


@pytest.fixture(scope="module")
def places(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace with one session, an empty config home and an empty runtime dir."""
    root = tmp_path_factory.mktemp("dsn")
    (root / "workspace").mkdir()
    db = WorkspaceDatabase(root / "workspace")
    try:
        db.save(Session(title="dsn"))
    finally:
        db.close()
    for name in ("config", "run"):
        (root / name).mkdir()
    return root


def env_with(places: Path, url: str) -> dict[str, str]:
    return child_env(
        ACODE_POSTGRES_URL=url,
        XDG_CONFIG_HOME=str(places / "config"),
        XDG_RUNTIME_DIR=str(places / "run"),
    )


def assert_config_error(result: subprocess.CompletedProcess[str], what: str) -> None:
    stderr = result.stderr
    assert result.returncode == 78, (what, stderr)
    assert stderr.startswith("ACODE-DB-007: "), (what, stderr)
    assert "Traceback" not in stderr, (what, stderr)
    assert "127.0.0.1/x" not in stderr, (what, stderr)


def test_a_malformed_dsn_stops_every_entry_point_with_exit_78(places: Path) -> None:
    workspace = str(places / "workspace")
    commands = (
        (SYNCD, "run"),
        (SYNCD, "check-config"),
        (ACODE, "db", "sync", "--workspace", workspace),
        (ACODE, "db", "migrate", "--postgres"),
    )
    for argv in commands:
        assert_config_error(run_cli(*argv, env=env_with(places, MALFORMED)), f"{argv} env")
    config = write_config(places / "malformed.toml", {"postgres": {"dsn": MALFORMED}})
    for argv in commands:
        result = run_cli(*argv, "--config", str(config), env=env_with(places, ""))
        assert_config_error(result, f"{argv} file")


def shown_outputs(places: Path, url: str) -> tuple[subprocess.CompletedProcess[str], ...]:
    env = env_with(places, url)
    check = run_cli(SYNCD, "check-config", env=env)
    status = run_cli(ACODE, "db", "status", "--workspace", str(places / "workspace"), env=env)
    return check, status


@pytest.fixture(scope="module")
def innocent_output(places: Path) -> str:
    """What the commands print with no password at all: a password spelt like a word they
    print anyway ('pool_min') shows nothing of a leak."""
    runs = shown_outputs(places, "postgresql://syncer@127.0.0.1:5432/acode")
    return "".join(run.stdout + run.stderr for run in runs)


@settings(max_examples=6, deadline=None)
@given(password=PASSWORDS)
@example(password="pa/ss#w?rd")
def test_no_password_reaches_check_config_or_db_status(
    places: Path, innocent_output: str, password: str
) -> None:
    shown = {password, unquote(password), quote(password, safe=""), json.dumps(password)[1:-1]}
    assume(not any(form in innocent_output for form in shown))
    for url, encoded in (
        (f"postgresql://syncer:{quote(password, safe='')}@127.0.0.1:5432/acode", True),
        (f"postgresql://syncer:{password}@127.0.0.1:5432/acode", False),
    ):
        check, status = shown_outputs(places, url)
        output = check.stdout + check.stderr + status.stdout + status.stderr
        assert not any(form in output for form in shown), output
        assert "Traceback" not in output
        assert status.returncode == 0, status.stderr
        if encoded:
            assert check.returncode == 0, check.stderr
            assert json.loads(check.stdout)["postgres"]["password"] == "********"
        else:
            assert check.returncode in (0, 78), check.stderr
            assert check.returncode == 0 or check.stderr.startswith("ACODE-DB-007: ")
