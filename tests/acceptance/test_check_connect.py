"""A least-privilege syncer role, granted exactly as docs/postgres.md says, syncs; and
`acode-syncd check-config --connect` names what is missing, one line per problem."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import pytest

from acode_sync.config import PostgresSettings
from acode_sync.domain import Session, format_timestamp, stamped, utc_now
from acode_sync.errors import PostgresRefusedError
from acode_sync.postgres import PostgresTarget
from acode_sync.store import WorkspaceDatabase
from tests.daemon_harness import (
    ACODE,
    SYNCD,
    child_env,
    free_port,
    pg_count,
    pg_execute,
    run_cli,
    write_config,
)

pytestmark = [pytest.mark.postgres, pytest.mark.processes]

DOCS = Path(__file__).resolve().parents[2] / "docs" / "postgres.md"


def documented_grants(role: str, database: str) -> str:
    section = DOCS.read_text().split("## A least-privilege syncer role", 1)[1]
    block = re.search(r"```sql\n(.*?)```", section, re.DOTALL)
    assert block is not None
    statements = [line for line in block[1].splitlines() if line.startswith("GRANT")]
    text = "\n".join(statements).replace("acode_sync", role)
    return text.replace("ON DATABASE acode ", f'ON DATABASE "{database}" ')


@pytest.fixture
def syncer(pg_url: str) -> Iterator[str]:
    """The DSN of a new role with exactly the documented grants (schema migrated)."""

    async def migrate() -> None:
        target = PostgresTarget(PostgresSettings(dsn=pg_url))
        try:
            await target.ensure_schema()
        finally:
            await target.close()

    anyio.run(migrate)
    role = "acode_syncer_" + secrets.token_hex(4)
    database = urlsplit(pg_url).path.lstrip("/")
    pg_execute(pg_url, f"CREATE ROLE {role} LOGIN; " + documented_grants(role, database))
    try:
        yield pg_url.replace("postgres@", f"{role}@", 1)
    finally:
        pg_execute(pg_url, f"DROP OWNED BY {role}; DROP ROLE {role}")


def _save_session(workspace: Path, session_id: str, age: timedelta) -> None:
    stamp = format_timestamp(utc_now() - age)
    workspace.mkdir(exist_ok=True)
    db = WorkspaceDatabase(workspace)
    try:
        db.save(
            stamped(
                Session(session_id=session_id, title=str(age)), created_at=stamp, updated_at=stamp
            )
        )
    finally:
        db.close()


def test_a_role_with_the_documented_grants_syncs(syncer: str, pg_url: str, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.toml", {"postgres": {"dsn": syncer, "auto_migrate": False}})
    checked = run_cli(SYNCD, "check-config", "--connect", "--config", str(config))
    assert checked.returncode == 0, checked.stderr
    assert "ok: schema acode at version" in checked.stderr
    assert "has every privilege a syncer needs" in checked.stderr
    assert checked.stderr.rstrip().endswith("PostgreSQL is ready for this syncer")

    # The newer version ships first; the older one, from another workspace, is a conflict.
    newer, older = tmp_path / "newer", tmp_path / "older"
    session_id = "sess_" + secrets.token_hex(8)
    _save_session(older, session_id, timedelta(minutes=5))
    _save_session(newer, session_id, timedelta(minutes=1))
    env = child_env(ACODE_POSTGRES_URL=syncer)
    for workspace in (newer, older):
        synced = run_cli(ACODE, "db", "sync", "--workspace", str(workspace), env=env)
        assert synced.returncode == 0, synced.stderr
    assert pg_count(pg_url, "conflicts") == 1
    listed = run_cli(ACODE, "db", "conflicts", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    assert session_id in listed.stdout

    # Retention is DDL (dropping partitions): the syncer is refused, the owner prunes.
    async def prune(dsn: str) -> int:
        target = PostgresTarget(PostgresSettings(dsn=dsn))
        try:
            return await target.prune_applied_keys(utc_now() + timedelta(days=1))
        finally:
            await target.close()

    with pytest.raises(PostgresRefusedError, match="42501"):
        anyio.run(prune, syncer)
    assert anyio.run(prune, pg_url) == 1  # the loser's: the version held is in its row


def test_check_config_connect_names_each_missing_privilege(
    syncer: str, pg_url: str, tmp_path: Path
) -> None:
    role = urlsplit(syncer).username
    pg_execute(pg_url, f"REVOKE INSERT ON acode.conflicts FROM {role}")
    pg_execute(pg_url, f"REVOKE DELETE ON acode.applied_keys FROM {role}")
    config = write_config(tmp_path / "c.toml", {"postgres": {"dsn": syncer}})
    checked = run_cli(SYNCD, "check-config", "--connect", "--config", str(config))
    assert checked.returncode == 69, checked.stderr
    problems = [line for line in checked.stderr.splitlines() if line.startswith("problem: ")]
    assert problems == [
        f"problem: role {role} lacks DELETE on table acode.applied_keys: "
        f"GRANT DELETE ON acode.applied_keys TO {role};",
        f"problem: role {role} lacks INSERT on table acode.conflicts: "
        f"GRANT INSERT ON acode.conflicts TO {role};",
    ]
    assert checked.stderr.rstrip().endswith("PostgreSQL: 2 problems")


def test_check_config_connect_reports_a_failed_connect_and_an_old_schema(
    pg_url: str, tmp_path: Path
) -> None:
    parts = urlsplit(pg_url)
    unreachable = pg_url.replace(f"{parts.hostname}:{parts.port}", f"127.0.0.1:{free_port()}")
    config = write_config(tmp_path / "c.toml", {"postgres": {"dsn": unreachable}})
    checked = run_cli(SYNCD, "check-config", "--connect", "--config", str(config))
    assert checked.returncode == 69, checked.stderr
    assert "problem: ACODE-DB-005" not in checked.stderr  # the message, without its code
    assert ": connecting: ConnectionRefusedError" in checked.stderr

    empty = write_config(tmp_path / "e.toml", {"postgres": {"dsn": pg_url, "auto_migrate": False}})
    checked = run_cli(SYNCD, "check-config", "--connect", "--config", str(empty))
    assert checked.returncode == 69, checked.stderr
    assert "problem: the schema acode does not exist: run `acode db migrate --postgres`" in (
        checked.stderr
    )
    assert run_cli(SYNCD, "check-config", "--config", str(empty)).returncode == 0
