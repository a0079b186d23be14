"""Every Prometheus collector of the daemon, on its own registry, and the /metrics server.

Gauges are kept current by the workers; nothing here opens a database at scrape time.
Labels are bounded: the only per-workspace series is `acode_sync_workspace_broken`, which
exists only while that workspace is broken.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

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
        build = Gauge("acode_sync_build_info", "Build information.", ["version"], registry=r)
        build.labels(__version__).set(1)


class MetricsServer:
    """/metrics over HTTP in its own thread (prometheus-client's WSGI server)."""

    def __init__(self, metrics: Metrics, address: str, port: int) -> None:
        self._server: WSGIServer
        self._thread: threading.Thread
        self._server, self._thread = start_http_server(port, address, registry=metrics.registry)

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
