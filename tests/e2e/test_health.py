"""/healthz and /readyz of the real daemon over real HTTP, through a real outage."""

from __future__ import annotations

import signal

import pytest

from tests.daemon_harness import forwarder, free_port, sample, save_sessions, wait_until
from tests.e2e.test_daemon import Rig, rig, with_port  # noqa: F401 - rig is a fixture
from tests.integration.test_health import get

pytestmark = [pytest.mark.postgres, pytest.mark.processes]


def test_readyz_follows_postgres_and_the_lag_while_healthz_stays_up(rig: Rig) -> None:  # noqa: F811
    port = free_port()  # nothing listens there until the forwarder starts
    save_sessions(rig.root / "w", 3)
    config = rig.config(
        dsn=with_port(rig.pg_url, port),
        postgres={"connect_timeout": 2.0},
        sync={"outage_base_seconds": 120.0, "outage_cap_seconds": 600.0},
    )
    config["metrics"]["ready_max_lag_seconds"] = 1.0
    with forwarder(port) as forward:
        daemon, _ = rig.start_ready(config)
        assert get(rig.port, "/healthz") == (200, {"status": "ok"})
        daemon.wait_log("postgres unavailable")

        def not_ready() -> dict[str, str] | None:
            status, body = get(rig.port, "/readyz")
            lagging = status == 503 and "the oldest pending record is" in body.get("reason", "")
            return body if lagging else None

        body = wait_until(not_ready, "/readyz 503 for the lag")
        assert body["status"] == "not ready"
        assert "PostgreSQL unreachable" in body["reason"]
        assert "(ready_max_lag_seconds 1)" in body["reason"]
        assert get(rig.port, "/healthz") == (200, {"status": "ok"})  # alive through it

        forward.start()
        daemon.signal(signal.SIGUSR1)
        rig.wait_sessions(3)
        wait_until(
            lambda: get(rig.port, "/readyz") == (200, {"status": "ready", "lag_seconds": 0}),
            "/readyz 200",
        )
        text = rig.metrics()
        assert sample(text, "acode_sync_records_total", result="applied") == 3
        # The standard collectors, on the daemon's registry.
        for name in ("process_start_time_seconds", "process_resident_memory_bytes"):
            value = sample(text, name)
            assert value is not None
            assert value > 0
        assert (sample(text, "process_open_fds") or 0) > 0
        assert "python_info{" in text
        assert "python_gc_collections_total{" in text
        assert rig.stop(daemon) == 0
    daemon.assert_no_traceback()
