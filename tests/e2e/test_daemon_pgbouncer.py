"""The real acode-syncd behind a real PgBouncer in transaction pooling: it migrates on
its first batch, ships, reloads a pool change, and waits out PostgreSQL's and
PgBouncer's outages without charging a record."""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from acode_sync.workspace import database_path
from tests.bouncer import pgbouncer
from tests.daemon_harness import (
    DaemonProcess,
    NotifySocket,
    daemon_config,
    free_port,
    outbox_counts,
    pg_count,
    sample,
    save_sessions,
    scrape,
    wait_until,
    write_config,
)
from tests.proxy import TcpProxy

pytestmark = [pytest.mark.postgres, pytest.mark.processes]


def errors_recorded(workspace: Path) -> int:
    conn = sqlite3.connect(database_path(workspace))
    try:
        (count,) = conn.execute("SELECT count(*) FROM outbox_errors").fetchone()
        return int(count)
    finally:
        conn.close()


def test_the_daemon_behind_pgbouncer_ships_reloads_and_waits_out_outages(
    tmp_path: Path, pg_url: str
) -> None:
    tmp_path = tmp_path.resolve()
    root = tmp_path / "root"
    workspaces = [root / f"ws{n}" for n in range(3)]
    for workspace in workspaces:
        save_sessions(workspace, 5)
    parts = urlsplit(pg_url)
    port = free_port()
    config_path = tmp_path / "acode-syncd.toml"

    def config(**postgres: Any) -> dict[str, Any]:
        return daemon_config(
            dsn=bouncer.url(pg_url),
            roots=[root],
            state_dir=tmp_path / "state",
            metrics_port=port,
            # As docs/postgres.md says for transaction pooling.
            postgres={"statement_cache_size": 0, "pool_max": 2, "connect_timeout": 2.0} | postgres,
        )

    def wait_sessions(count: int) -> None:
        wait_until(lambda: pg_count(pg_url, "sessions") == count, f"{count} sessions")

    def wait_up(value: int) -> None:
        wait_until(
            lambda: sample(scrape(port), "acode_sync_postgres_up") == value,
            f"acode_sync_postgres_up {value}",
        )

    def assert_waiting(saved: int) -> None:
        """The new records wait, pending, and not one attempt is charged."""
        counts = [outbox_counts(w) for w in workspaces]
        assert sum(c.get("pending", 0) for c in counts) == saved, counts
        assert {state for c in counts for state in c} <= {"pending", "processed"}
        assert sum(errors_recorded(w) for w in workspaces) == 0

    with (
        TcpProxy(upstream=(parts.hostname or "127.0.0.1", parts.port or 5432)) as proxy,
        pgbouncer(("127.0.0.1", proxy.port), default_pool_size=2) as bouncer,
        NotifySocket() as notify,
    ):
        write_config(config_path, config())
        daemon = DaemonProcess.start(config_path, notify=notify, workdir=tmp_path)
        try:
            notify.wait_for("READY=1")
            wait_sessions(15)  # the first batch created the schema through PgBouncer
            assert bouncer.server_connections(parts.path.lstrip("/")) <= 2

            # A reload with a larger pool, and PgBouncer's own pool grown to match.
            bouncer.reconfigure(default_pool_size=4)
            write_config(config_path, config(pool_max=4))
            mark = len(notify.messages)
            daemon.signal(signal.SIGHUP)
            notify.wait_for("READY=1", start=notify.wait_for("RELOADING=1", start=mark))
            daemon.wait_log("configuration reloaded", workspaces=3)
            for workspace in workspaces:
                save_sessions(workspace, 2, title="after reload")
            wait_sessions(21)

            # PostgreSQL gone, PgBouncer up: an outage, not the records' failure.
            bouncer.reconfigure(query_wait_timeout=1)
            proxy.down()
            save_sessions(workspaces[0], 3, title="during the outage")
            wait_up(0)
            unavailable = daemon.wait_log("postgres unavailable")
            assert unavailable["code"] == "ACODE-DB-005"
            assert_waiting(3)
            proxy.restore()
            wait_sessions(24)
            wait_up(1)

            # PgBouncer itself gone, then back on the same port.
            bouncer.stop()
            save_sessions(workspaces[1], 3, title="pgbouncer away")
            wait_up(0)
            assert_waiting(3)
            bouncer.start()
            wait_sessions(27)
            wait_up(1)
            assert [outbox_counts(w) for w in workspaces] == [{"processed": n} for n in (10, 10, 7)]

            daemon.signal(signal.SIGTERM)
            assert daemon.wait(30) == 0
        finally:
            daemon.close()
    daemon.assert_no_traceback()
