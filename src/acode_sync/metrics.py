"""Every Prometheus collector of the daemon, on its own registry, and the HTTP server of
/metrics, /healthz and /readyz.

Gauges are kept current by the workers; nothing here opens a database at scrape time.
Labels are bounded: no series per record, session or entity. The per-workspace series are
`acode_sync_workspace_broken`, which exists only while that workspace is broken, and the
scheduled verify's (`acode_sync_verify_*{workspace}`), a handful per watched workspace,
removed with it. The health checks are answered from what the
event loop last recorded, never by calling into it.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIEnvironment

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)

from acode_sync import __version__

BATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(
        default_factory=lambda: CollectorRegistry(auto_describe=True)
    )

    def __post_init__(self) -> None:
        r = self.registry
        self.records = Counter(
            "acode_sync_records",
            "Outbox records delivered to PostgreSQL, by result.",
            ["result"],
            registry=r,
        )
        for result in ("applied", "duplicate", "conflict"):
            self.records.labels(result)
        self.conflicts = Counter(
            "acode_sync_conflicts",
            "Conflicts detected and recorded (last write wins).",
            registry=r,
        )
        self.retries = Counter(
            "acode_sync_retries",
            "Record delivery attempts that failed and will be retried.",
            registry=r,
        )
        self.dead_letters = Counter(
            "acode_sync_dead_letters",
            "Records that failed their last attempt (dead letters).",
            registry=r,
        )
        self.batch_errors = Counter(
            "acode_sync_batch_errors",
            "Batches not applied because PostgreSQL was unavailable.",
            registry=r,
        )
        self.backlog = Gauge(
            "acode_sync_backlog_records",
            "Pending outbox records across all workspaces.",
            registry=r,
        )
        self.lag = Gauge(
            "acode_sync_lag_seconds", "Age of the oldest pending outbox record.", registry=r
        )
        self.batch_duration = Histogram(
            "acode_sync_batch_duration_seconds",
            "Time to apply and mark one batch.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.workspaces = Gauge("acode_sync_workspaces", "Workspaces watched.", registry=r)
        self.workspaces_broken = Gauge(
            "acode_sync_workspaces_broken",
            "Workspaces that cannot be synced, by error code.",
            ["code"],
            registry=r,
        )
        self.workspace_broken = Gauge(
            "acode_sync_workspace_broken",
            "1 while this workspace cannot be synced (the series goes away when it recovers).",
            ["workspace", "code"],
            registry=r,
        )
        self.postgres_up = Gauge(
            "acode_sync_postgres_up",
            "1 when PostgreSQL answered the last attempt, else 0.",
            registry=r,
        )
        self.postgres_refusing = Gauge(
            "acode_sync_postgres_refusing",
            "1 while PostgreSQL answers but refuses the work (read-only, a missing privilege, "
            "a full disk ...), by SQLSTATE; records wait, none is charged.",
            ["sqlstate"],
            registry=r,
        )
        self.pool_in_use = Gauge(
            "acode_sync_pool_connections_in_use",
            "PostgreSQL pool connections in use.",
            registry=r,
        )
        self.reloads = Counter(
            "acode_sync_config_reloads",
            "Configuration reloads, by result.",
            ["result"],
            registry=r,
        )
        for result in ("success", "failure"):
            self.reloads.labels(result)
        self.last_sync = Gauge(
            "acode_sync_last_success_timestamp_seconds",
            "Unix time of the last batch applied to PostgreSQL.",
            registry=r,
        )
        self.verify_mismatches = Gauge(
            "acode_sync_verify_mismatches",
            "Differences the last scheduled verify of this workspace found, by kind "
            "(superseded versions, expected, are not counted).",
            ["workspace", "kind"],
            registry=r,
        )
        self.verify_last_success = Gauge(
            "acode_sync_verify_last_success_timestamp_seconds",
            "Unix time the last scheduled verify of this workspace completed.",
            ["workspace"],
            registry=r,
        )
        self.verify_runs = Counter(
            "acode_sync_verify_runs",
            "Scheduled verifies, by result: ok, mismatch (differences found), error.",
            ["result"],
            registry=r,
        )
        for result in ("ok", "mismatch", "error"):
            self.verify_runs.labels(result)
        self.verify_interval = Gauge(
            "acode_sync_verify_interval_seconds",
            "How often each workspace is verified (daemon.verify_interval_hours); 0: never.",
            registry=r,
        )
        self.history_partitions = Gauge(
            "acode_sync_history_partitions",
            "Range partitions of the version history after this daemon's last maintenance "
            "(postgres.keep_history); 0 until it maintained them.",
            registry=r,
        )
        self.history_outside_rows = Gauge(
            "acode_sync_history_default_rows",
            "Versions in the history's DEFAULT partition (no range partition covers them) "
            "after this daemon's last maintenance.",
            registry=r,
        )
        self.history_maintenance = Counter(
            "acode_sync_history_maintenance",
            "Maintenance runs of the version history's partitions, by result: ok, error.",
            ["result"],
            registry=r,
        )
        for result in ("ok", "error"):
            self.history_maintenance.labels(result)
        build = Gauge("acode_sync_build_info", "Build information.", ["version"], registry=r)
        build.labels(__version__).set(1)
        # The standard process_* (CPU, memory, open files, start time) and python_*
        # (version, garbage collector) series, as every Prometheus client exposes them.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)


@dataclass(frozen=True, slots=True)
class Health:
    """A health check's answer: 200 when `ok`, else 503; `body` is sent as JSON."""

    ok: bool
    body: dict[str, Any]


HealthCheck = Callable[[], Health]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No access log: scrapes and probes come every few seconds."""


class MetricsServer:
    """/metrics, /healthz and /readyz over HTTP, in a thread of its own."""

    def __init__(
        self,
        metrics: Metrics,
        address: str,
        port: int,
        *,
        alive: HealthCheck,
        ready: HealthCheck,
    ) -> None:
        self._metrics_app = make_wsgi_app(metrics.registry)
        self._checks = {"/healthz": alive, "/readyz": ready}
        family = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0][0]
        server_class = type("_Server", (_Server,), {"address_family": family})
        self._server: WSGIServer = make_server(
            address, port, self._app, server_class, _QuietHandler
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True
        )
        self._thread.start()

    def _app(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        check = self._checks.get(environ.get("PATH_INFO", ""))
        if check is None:
            body: Iterable[bytes] = self._metrics_app(environ, start_response)
            return body
        health = check()
        text = json.dumps(health.body).encode()
        status = "200 OK" if health.ok else "503 Service Unavailable"
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(text)))]
        start_response(status, headers)
        return [text]

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
