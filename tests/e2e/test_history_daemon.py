"""A daemon with postgres.keep_history on: it maintains the history's partitions at start
(the schema's owner) or says in its log why it cannot (a syncer role), and every version
it applies is in the history."""

from __future__ import annotations

import signal

import anyio
import pytest

from acode_sync.config import PostgresSettings
from acode_sync.postgres import PostgresTarget
from tests.daemon_harness import pg_count, pg_execute, sample, save_sessions, wait_until
from tests.e2e.test_daemon import Rig, rig

pytestmark = [pytest.mark.postgres, pytest.mark.processes]
__all__ = ["rig"]

HISTORY = {"keep_history": True, "history_retention_days": 3}


def test_the_daemon_maintains_the_history_and_appends_every_version(rig: Rig) -> None:
    daemon, _ = rig.start_ready(rig.config(postgres=HISTORY))
    wait_until(lambda: daemon.find("version history maintained"), "the maintenance")
    (line,) = daemon.find("version history maintained")
    assert (line["created"], line["dropped"], line["default_rows"]) == (3 + 1 + 7, 0, 0)
    text = rig.metrics()
    assert sample(text, "acode_sync_history_partitions") == 11
    assert sample(text, "acode_sync_history_maintenance_total", result="ok") == 1
    save_sessions(rig.root / "w", 4)
    rig.wait_sessions(4)
    assert pg_count(rig.pg_url, "acode.entity_history") == 4
    assert rig.stop(daemon) == 0
    daemon.assert_no_traceback()


async def migrate(url: str) -> None:
    """As the schema's owner."""
    target = PostgresTarget(PostgresSettings(dsn=url))
    try:
        await target.ensure_schema()
    finally:
        await target.close()


def test_a_syncer_role_cannot_maintain_it_and_says_so_while_records_still_apply(
    rig: Rig,
) -> None:
    anyio.run(migrate, rig.pg_url)
    pg_execute(rig.pg_url, "DROP ROLE IF EXISTS acode_hist_syncer")
    pg_execute(rig.pg_url, "CREATE ROLE acode_hist_syncer LOGIN")
    try:
        pg_execute(
            rig.pg_url,
            "GRANT USAGE ON SCHEMA acode TO acode_hist_syncer; "
            "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA acode "
            "TO acode_hist_syncer; "
            "GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA acode TO acode_hist_syncer",
        )
        dsn = rig.pg_url.replace("postgres@", "acode_hist_syncer@")
        daemon, _ = rig.start_ready(rig.config(dsn=dsn, postgres=HISTORY))
        wait_until(lambda: daemon.find("cannot maintain the version history"), "the warning")
        (line,) = daemon.find("cannot maintain the version history")
        assert "ACODE-DB-005" in line["error"]
        assert sample(rig.metrics(), "acode_sync_history_maintenance_total", result="error") == 1
        save_sessions(rig.root / "w", 2)
        rig.wait_sessions(2)
        # No range partition yet: the versions wait in the DEFAULT partition.
        assert pg_count(rig.pg_url, "acode.entity_history_default") == 2
        assert rig.stop(daemon) == 0
        daemon.assert_no_traceback()
    finally:
        pg_execute(rig.pg_url, "DROP OWNED BY acode_hist_syncer; DROP ROLE acode_hist_syncer")


def test_turning_the_history_on_by_reload_maintains_it_at_once(rig: Rig) -> None:
    save_sessions(rig.root / "w", 1)
    daemon, _ = rig.start_ready(rig.config())
    rig.wait_sessions(1)
    assert not daemon.find("version history maintained")
    rig.write(rig.config(postgres=HISTORY))
    daemon.signal(signal.SIGHUP)
    daemon.wait_log("configuration reloaded")
    daemon.wait_log("version history maintained")
    save_sessions(rig.root / "w", 2)
    rig.wait_sessions(3)
    wait_until(lambda: pg_count(rig.pg_url, "acode.entity_history") == 2, "2 versions kept")
    assert pg_count(rig.pg_url, "acode.entity_history_default") == 0
    assert rig.stop(daemon) == 0
    daemon.assert_no_traceback()
