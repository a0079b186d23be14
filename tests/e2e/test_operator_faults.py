"""An operator's ordinary bad day, against the real daemon: a password rotated in its file.

Every wait is for an event with a generous timeout; nothing asserts on speed.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Final

import pytest

from tests.cluster import CLUSTER_PASSWORD, PasswordCluster, password_cluster
from tests.daemon_harness import (
    DaemonProcess,
    NotifySocket,
    daemon_config,
    free_port,
    pg_count,
    pg_execute,
    save_sessions,
    wait_until,
    write_config,
)

pytestmark = [pytest.mark.postgres, pytest.mark.processes]

ROTATED_PASSWORD: Final = "Rotated-Pa55-2291"


def _authenticated(cluster: PasswordCluster, password: str) -> str:
    return f"postgresql://postgres:{password}@127.0.0.1:{cluster.port}/postgres"


def test_a_password_rotated_in_its_file_takes_effect_on_sighup(tmp_path: Path) -> None:
    root = tmp_path / "root"
    password_file = tmp_path / "pg-password"
    password_file.write_text(CLUSTER_PASSWORD + "\n")
    password_file.chmod(0o600)
    with password_cluster() as cluster, NotifySocket() as notify:
        config = daemon_config(
            dsn=cluster.url(),
            roots=[root],
            state_dir=tmp_path / "state",
            metrics_port=free_port(),
            postgres={"password_file": str(password_file)},
            sync={"outage_cap_seconds": 2.0},
        )
        config_path = write_config(tmp_path / "acode-syncd.toml", config)
        save_sessions(root / "w", 2)
        daemon = DaemonProcess.start(config_path, notify=notify, workdir=tmp_path)
        try:
            notify.wait_for("READY=1")
            old_url = _authenticated(cluster, CLUSTER_PASSWORD)
            wait_until(lambda: pg_count(old_url, "sessions") == 2, "2 sessions shipped")

            # The rotation: the role's password, then the file, in place (same path).
            pg_execute(old_url, f"ALTER ROLE postgres PASSWORD '{ROTATED_PASSWORD}'")
            password_file.write_text(ROTATED_PASSWORD + "\n")
            new_url = _authenticated(cluster, ROTATED_PASSWORD)
            # Open connections outlive the change; end them, so the daemon must log in again.
            pg_execute(
                new_url,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'acode-syncd'",
            )
            save_sessions(root / "w", 1, title="before the reload")
            refused = daemon.wait_log("postgres refused")
            assert "the server rejected the password" in refused["error"]

            daemon.signal(signal.SIGHUP)
            daemon.wait_log("configuration reloaded")
            save_sessions(root / "w", 2, title="after the reload")
            wait_until(lambda: pg_count(new_url, "sessions") == 5, "every session shipped")
            assert daemon.find("postgres password changed: new connections use the new one")

            daemon.signal(signal.SIGTERM)
            assert daemon.wait(30) == 0
            daemon.assert_no_traceback()
            output = daemon.stdout() + daemon.stderr()
            assert CLUSTER_PASSWORD not in output
            assert ROTATED_PASSWORD not in output
        finally:
            daemon.close()
