"""acode-syncd's supervisor: workers, signals, reload, drain, sd_notify, status.

Three phases, like any well-behaved service: start (metrics listener, workers, then
READY=1), run (signals turn into actions), stop (stop claiming, let in-flight batches
commit within the drain timeout, close the pool, exit 0).
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.to_thread
from anyio.abc import TaskGroup, TaskStatus

from acode_sync import __version__, retention
from acode_sync.config import Config, load_config
from acode_sync.discovery import discover
from acode_sync.errors import (
    AcodeError,
    ConfigError,
    WorkspaceOpenError,
)
from acode_sync.history import MAINTENANCE_INTERVAL, maintain_history
from acode_sync.log import configure_logging, get_logger
from acode_sync.metrics import Health, Metrics, MetricsServer
from acode_sync.postgres import PostgresTarget, RecordFailure
from acode_sync.runtime import hold_state_dir, remove_status, state_dir, write_status
from acode_sync.sync import tune_interpreter
from acode_sync.systemd import Notifier, watchdog_interval
from acode_sync.verify_schedule import VerifyScheduler
from acode_sync.watcher import Watcher, make_watcher
from acode_sync.worker import Heartbeat, Shared, WorkspaceWorker

STATUS_SECONDS: Final = 2.0
PROBE_SECONDS: Final = 30.0
# While PostgreSQL is down (not refusing), probe it this often, so its return is seen
# at once rather than when each workspace's own outage backoff (up to a minute) ends.
OUTAGE_PROBE_SECONDS: Final = 1.0
# The workspaces waiting out an outage resume spread over this long, not all at once.
RESUME_SPREAD_SECONDS: Final = 1.5
# A directory event under a root: rescan after this pause, so that a burst of creations
# (mkdir -p, a database's first commits) costs one walk.
TREE_SETTLE_SECONDS: Final = 0.2
PRUNE_SECONDS: Final = 3600.0
LOOP_BEAT_SECONDS: Final = 1.0
# /healthz fails when the event loop has not run its beat for this long.
LOOP_STALL_SECONDS: Final = 10.0


def concurrent_syncs(config: Config) -> int:
    """How many workspaces ship batches at once: never more than the pool has connections."""
    return min(config.postgres.pool_max, config.daemon.max_concurrent_syncs)


def _listener(config: Config) -> tuple[bool, str, int]:
    """The metrics settings that need a new listener when they change."""
    metrics = config.metrics
    return metrics.enabled, metrics.address, metrics.port


def configure_daemon_logging(config: Config, password: str | None) -> None:
    log_format = config.daemon.log_format
    configure_logging(
        level=config.daemon.log_level,
        json_lines=None if log_format == "auto" else log_format == "json",
        secrets=[password] if password else [],
    )


class Daemon:
    def __init__(
        self,
        config: Config,
        *,
        config_path: Path | None,
        environ: Mapping[str, str],
        cwd: Path,
        password: str | None = None,
    ) -> None:
        self.config = config
        # What the pool authenticates with: a password file rewritten in place leaves the
        # settings equal, so a reload compares this too.
        self._password = password
        self.config_path = config_path
        # Fixed for the process's life: the directory it holds the lock of.
        self.state_dir = state_dir(config.daemon, environ, config_path)
        self.environ = environ
        self.cwd = cwd
        self.log = get_logger()
        self.metrics = Metrics()
        self.notifier = Notifier(environ)
        self.heartbeat = Heartbeat()
        self.workers: dict[Path, WorkspaceWorker] = {}
        self.refused: dict[Path, WorkspaceOpenError] = {}
        self.started_at = datetime.now(UTC).isoformat()
        self.postgres_up: bool | None = None
        self.postgres_refused: str | None = None
        self.last_postgres_report = 0.0
        self.lag_seconds = 0
        self.loop_beat = time.monotonic()
        self.loop_stall_seconds = LOOP_STALL_SECONDS
        self.reload: dict[str, Any] = {"generation": 0, "ok": True, "error": None, "at": None}
        self._stop = anyio.Event()
        self._rescan_wanted = anyio.Event()
        self._rescan_lock = anyio.Lock()
        self._outage_seen = anyio.Event()
        self._status_soon = anyio.Event()
        self._rng = random.Random()  # noqa: S311 - jitter, not secrets
        self._watcher: Watcher | None = None
        self._metrics_server: MetricsServer | None = None
        self._workers_tg: TaskGroup | None = None
        self._workers_scope: anyio.CancelScope | None = None
        self._services: TaskGroup | None = None
        self._status_line = ""
        self._status_written: dict[str, Any] = {}
        target = PostgresTarget(config.postgres)
        self.shared = Shared(
            config=config,
            target=target,
            metrics=self.metrics,
            limiter=anyio.CapacityLimiter(concurrent_syncs(config)),
            on_postgres=self._on_postgres,
            watchdog=self.heartbeat,
            on_backlog=lambda: self._status_soon.set(),
        )
        self.verifier = VerifyScheduler(workspaces=self.workers.keys, shared=lambda: self.shared)

    # -- the three phases -------------------------------------------------------------

    async def run(self) -> int:
        if self.config.postgres.is_remote_without_tls():
            self.log.warning(
                "postgres connection is not encrypted", host=self.config.postgres.host_description()
            )
        self._metrics_server = await self._start_metrics(self.config)
        self._watcher = make_watcher()
        try:
            async with anyio.create_task_group() as services:
                self._services = services
                services.start_soon(self._beat_loop)
                await services.start(self._signal_loop)
                with anyio.CancelScope() as workers_scope:
                    self._workers_scope = workers_scope
                    async with anyio.create_task_group() as workers:
                        self._workers_tg = workers
                        await self._rescan()
                        self._start_services(services)
                        self.notifier.ready(self.status_line())
                        self.log.info(
                            "ready",
                            version=__version__,
                            workspaces=len(self.workers),
                            postgres=self.config.postgres.host_description(),
                        )
                        await self._stop.wait()
                        self._begin_drain()
                if workers_scope.cancelled_caught:
                    self.log.warning("drain abandoned: in-flight batches were rolled back")
                services.cancel_scope.cancel()
        finally:
            await self._shut_down()
        self.log.info("stopped")
        return 0

    def _start_services(self, services: TaskGroup) -> None:
        services.start_soon(self._watch_loop)
        services.start_soon(self._rescan_loop)
        services.start_soon(self._status_loop)
        services.start_soon(self._probe_loop)
        services.start_soon(self._prune_loop)
        services.start_soon(self._history_loop)
        services.start_soon(self._summary_loop)
        services.start_soon(self.verifier.run)
        interval = watchdog_interval(self.environ, os.getpid())
        if interval:
            services.start_soon(self._watchdog_loop, interval)

    def _begin_drain(self) -> None:
        self.notifier.stopping()
        timeout = self.config.daemon.drain_timeout_seconds
        self.log.info("stopping: letting in-flight batches commit", drain_timeout_seconds=timeout)
        assert self._workers_scope is not None
        self._workers_scope.deadline = anyio.current_time() + timeout
        for worker in self.workers.values():
            worker.stop()

    async def _shut_down(self) -> None:
        with anyio.CancelScope(shield=True):
            if self._watcher is not None:
                self._watcher.close()
            if self._metrics_server is not None:
                await anyio.to_thread.run_sync(self._metrics_server.close)
            await self.shared.target.close()
            remove_status(self.state_dir)

    # -- signals ------------------------------------------------------------------------

    async def _signal_loop(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        wanted = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
        with anyio.open_signal_receiver(*wanted) as signals:
            task_status.started()
            async for signum in signals:
                if signum in (signal.SIGTERM, signal.SIGINT):
                    self._on_stop_signal(signal.Signals(signum).name)
                elif signum == signal.SIGHUP:
                    await self._reload()
                else:
                    self.log.info("syncing every workspace now", signal="SIGUSR1")
                    for worker in self.workers.values():
                        worker.sync_now()

    def _on_stop_signal(self, name: str) -> None:
        if not self._stop.is_set():
            self.log.info("stop requested", signal=name)
            self._stop.set()
        elif self._workers_scope is not None:
            self.log.warning("second stop signal: abandoning the drain", signal=name)
            self._workers_scope.cancel()

    # -- reload -------------------------------------------------------------------------

    async def _reload(self) -> None:
        self.notifier.reloading()
        self.log.info("reloading configuration", path=str(self.config_path or "(defaults)"))
        try:
            new = await anyio.to_thread.run_sync(load_config, self.config_path, self.environ)
            password = await anyio.to_thread.run_sync(new.postgres.resolved_password)
            metrics_server = self._metrics_server
            if _listener(new) != _listener(self.config):
                metrics_server = await self._start_metrics(new)
        except ConfigError as error:
            self.metrics.reloads.labels("failure").inc()
            self._record_reload(f"{error.code}: {error.message}")
            self.log.error(
                "reload rejected: keeping the old configuration",
                code=error.code,
                error=error.message,
            )
            self.notifier.ready(self.status_line())
            return
        self._apply(new, password, metrics_server)
        await self._rescan()
        self.metrics.reloads.labels("success").inc()
        self._record_reload(None)
        self.log.info("configuration reloaded", workspaces=len(self.workers))
        self.notifier.ready(self.status_line())

    def _apply(
        self, new: Config, password: str | None, metrics_server: MetricsServer | None
    ) -> None:
        old = self.config
        if metrics_server is not self._metrics_server and self._metrics_server is not None:
            self._metrics_server.close()
        self._metrics_server = metrics_server
        target = self.shared.target
        if new.postgres != old.postgres or password != self._password:
            if new.postgres == old.postgres:
                self.log.info("postgres password changed: new connections use the new one")
            retired, target = target, PostgresTarget(new.postgres)
            assert self._services is not None
            self._services.start_soon(retired.close)  # after its in-flight batches
        self.shared.limiter.total_tokens = concurrent_syncs(new)
        self.shared = replace(self.shared, config=new, target=target)
        for worker in self.workers.values():
            worker.update(self.shared)
        self.config = new
        self._password = password
        configure_daemon_logging(new, password)
        if new.postgres.keep_history and not old.postgres.keep_history:
            assert self._services is not None
            self._services.start_soon(self.maintain_history_once)  # not a day later

    def _record_reload(self, error: str | None) -> None:
        self.reload = {
            "generation": self.reload["generation"] + 1,
            "ok": error is None,
            "error": error,
            "at": datetime.now(UTC).isoformat(),
        }
        self._write_status()

    async def _start_metrics(self, config: Config) -> MetricsServer | None:
        if not config.metrics.enabled:
            return None
        settings = config.metrics
        try:
            return await anyio.to_thread.run_sync(
                lambda: MetricsServer(
                    self.metrics,
                    settings.address,
                    settings.port,
                    alive=self.liveness,
                    ready=self.readiness,
                )
            )
        except OSError as error:
            raise ConfigError(
                f"metrics: cannot listen on {settings.address}:{settings.port}: "
                f"{error.strerror or error}"
            ) from None

    # -- workspaces ---------------------------------------------------------------------

    async def _rescan(self) -> None:
        async with self._rescan_lock:
            await self._rescan_once()

    async def _rescan_once(self) -> None:
        assert self._watcher is not None
        while True:
            discovery = await anyio.to_thread.run_sync(
                discover, self.config.daemon, self.cwd, frozenset(self.workers)
            )
            # What was created under a new directory before its watch was added has
            # sent no event: walk again until no new directory is watched.
            if not self._watcher.watch_tree(discovery.directories):
                break
        found = discovery.workspaces
        for workspace, error in sorted(discovery.refused.items()):
            if workspace not in self.refused:
                self.log.warning(
                    "workspace refused",
                    workspace=str(workspace),
                    code=error.code,
                    error=error.message,
                )
        self.refused = discovery.refused
        assert self._workers_tg is not None
        for workspace in sorted(found - set(self.workers)):
            try:
                self._watcher.add(workspace)
            except OSError as error:
                self.log.warning(
                    "cannot watch workspace", workspace=str(workspace), error=error.strerror
                )
            worker = WorkspaceWorker(workspace, self.shared)
            self.workers[workspace] = worker
            await self._workers_tg.start(worker.run)
            self.log.info("workspace added", workspace=str(workspace))
        for workspace in sorted(set(self.workers) - found):
            self._watcher.remove(workspace)
            self.workers.pop(workspace).stop()
            self.log.info("workspace removed", workspace=str(workspace))
        self.metrics.workspaces.set(len(self.workers))
        self._status_soon.set()
        self.verifier.wake()

    async def _rescan_loop(self) -> None:
        """Every rescan_seconds, and soon after the watcher saw a directory or a
        database appear under a root (the periodic scan is the safety net)."""
        while True:
            with anyio.move_on_after(self.config.daemon.rescan_seconds):
                await self._rescan_wanted.wait()
                await anyio.sleep(TREE_SETTLE_SECONDS)
            self._rescan_wanted = anyio.Event()
            await self._rescan()

    async def _watch_loop(self) -> None:
        assert self._watcher is not None
        while True:
            changes = await self._watcher.changed()
            if changes.tree:
                self._rescan_wanted.set()
            for workspace in changes.workspaces:
                worker = self.workers.get(workspace)
                if worker is not None:
                    worker.notify_change()

    # -- health -------------------------------------------------------------------------

    async def _beat_loop(self) -> None:
        """The event loop's sign of life, read by /healthz from the HTTP thread."""
        while True:
            self.loop_beat = time.monotonic()
            await anyio.sleep(LOOP_BEAT_SECONDS)

    def liveness(self) -> Health:
        """/healthz (called in the HTTP thread): the event loop beats."""
        stalled = time.monotonic() - self.loop_beat
        if stalled > self.loop_stall_seconds:
            return Health(
                False,
                {"status": "stalled", "reason": f"the event loop has not run for {stalled:.0f} s"},
            )
        return Health(True, {"status": "ok"})

    def readiness(self) -> Health:
        """/readyz (called in the HTTP thread): alive, PostgreSQL answers and takes the
        work, and the oldest pending record is younger than ready_max_lag_seconds."""
        reasons = []
        alive = self.liveness()
        if not alive.ok:
            reasons.append(alive.body["reason"])
        if self.postgres_refused is not None:
            reasons.append(f"PostgreSQL refuses the work (SQLSTATE {self.postgres_refused})")
        elif self.postgres_up is None:
            reasons.append("PostgreSQL not contacted yet")
        elif not self.postgres_up:
            reasons.append("PostgreSQL unreachable")
        limit = self.config.metrics.ready_max_lag_seconds
        if self.lag_seconds > limit:
            reasons.append(
                f"the oldest pending record is {self.lag_seconds} s old "
                f"(ready_max_lag_seconds {limit:g})"
            )
        body: dict[str, Any] = {"status": "not ready" if reasons else "ready"}
        if reasons:
            body["reason"] = "; ".join(reasons)
        body["lag_seconds"] = self.lag_seconds
        return Health(not reasons, body)

    def _on_postgres(self, up: bool, refused: str | None = None) -> None:
        """A worker's (or the probe's) news of PostgreSQL. `refused`: the SQLSTATE of a
        refusal (the server answers but refuses the work); it stands until a batch is
        applied again: a probe that answers does not clear it."""
        self.last_postgres_report = time.monotonic()
        if refused != self.postgres_refused:
            if self.postgres_refused is not None:
                self.metrics.postgres_refusing.remove(self.postgres_refused)
            if refused is not None:
                self.metrics.postgres_refusing.labels(refused).set(1)
            self.postgres_refused = refused
            self._status_soon.set()
        if up == self.postgres_up:
            return
        self._status_soon.set()
        was, self.postgres_up = self.postgres_up, up
        self.metrics.postgres_up.set(1 if up else 0)
        if not up:
            self._outage_seen.set()
            if was is not None:
                self.log.info("postgres down")
            return
        waiting = [w for w in self.workers.values() if w.waiting_out_outage]
        if was is not None:
            self.log.info("postgres up", resuming_workspaces=len(waiting))
        if waiting and self._services is not None:
            self._services.start_soon(self._resume, waiting)

    async def _resume(self, workers: list[WorkspaceWorker]) -> None:
        """End the outage waits, each at a random time within RESUME_SPREAD_SECONDS."""
        times = sorted((self._rng.uniform(0, RESUME_SPREAD_SECONDS), w) for w in workers)
        start = anyio.current_time()
        for at, worker in times:
            await anyio.sleep_until(start + at)
            worker.resume_after_outage()

    def _in_outage(self) -> bool:
        """PostgreSQL unreachable. A refusal is not an outage: the server answers the
        probe while it refuses the work, and only an applied batch ends a refusal."""
        return self.postgres_up is False and self.postgres_refused is None

    async def _probe_loop(self) -> None:
        """Keep acode_sync_postgres_up true when no worker has talked to PostgreSQL
        lately, and during an outage probe every OUTAGE_PROBE_SECONDS to see it end."""
        while True:
            quiet = time.monotonic() - self.last_postgres_report >= PROBE_SECONDS
            if self._in_outage() or (quiet and self.postgres_refused is None):
                up = await self.shared.target.probe()
                if self.postgres_refused is None:  # a refusal reported meanwhile stands
                    self._on_postgres(up)
            self._outage_seen = anyio.Event()
            with anyio.move_on_after(OUTAGE_PROBE_SECONDS if self._in_outage() else PROBE_SECONDS):
                await self._outage_seen.wait()

    async def _summary_loop(self) -> None:
        while True:
            await anyio.sleep(self.config.daemon.summary_interval_seconds)
            for worker in self.workers.values():
                worker.log_summary()

    async def _prune_loop(self) -> None:
        """Hourly: drop the partitions of applied keys older than the key retention (and of
        conflicts older than sync.conflict_retention_days, when set), and create the
        partitions ahead (docs/postgres.md#retention)."""
        while True:
            await anyio.sleep(PRUNE_SECONDS)
            await self.prune_once()

    async def prune_once(self) -> None:
        """Partition maintenance is DDL: a syncer role that does not own the tables is
        refused, logged here; the schema's owner runs `acode db prune` instead."""
        for spec, days in retention.plans(self.config.sync):
            before = retention.cutoff(days, datetime.now(UTC))
            try:
                forgotten = await self.shared.target.prune(spec, before)
            except (AcodeError, RecordFailure) as error:
                # Any refusal (an unknown schema, a row raced into a new partition's range:
                # 23514): tried again next hour; this loop must not end the daemon.
                code = error.code if isinstance(error, AcodeError) else None
                message = error.message if isinstance(error, AcodeError) else str(error)
                self.log.warning(f"cannot prune {spec.table}", code=code, error=message)
                continue
            if forgotten:
                self.log.info(f"pruned {spec.table}", rows=forgotten, older_than_days=days)

    async def _history_loop(self) -> None:
        """With postgres.keep_history on: the history's partitions maintained at start, then
        daily (every daemon may; they take turns under a lock, and only the first finds
        work). Maintenance is DDL, for the schema's owner: a syncer role is told so in the
        log, and its records are still applied (into the DEFAULT partition if need be)."""
        while True:
            if self.config.postgres.keep_history:
                await self.maintain_history_once()
            await anyio.sleep(MAINTENANCE_INTERVAL.total_seconds())

    async def maintain_history_once(self) -> None:
        try:
            report = await maintain_history(self.shared.target)
        except (AcodeError, RecordFailure) as error:  # str(): the ACODE-DB code and message
            self.metrics.history_maintenance.labels("error").inc()
            self.log.warning("cannot maintain the version history", error=str(error))
            return
        self.metrics.history_maintenance.labels("ok").inc()
        self.metrics.history_partitions.set(sum(p.start is not None for p in report.partitions))
        self.metrics.history_outside_rows.set(report.outside_rows)
        self.log.info(
            "version history maintained",
            created=len(report.created),
            dropped=len(report.dropped),
            partitions=len(report.partitions),
            default_rows=report.outside_rows,
        )

    async def _watchdog_loop(self, interval: float) -> None:
        """WATCHDOG=1 every half WATCHDOG_USEC unless the daemon itself is wedged: a
        stalled event loop sends nothing, and an operation past its own time limit
        withholds the ping. PostgreSQL being down never does."""
        while True:
            overdue = self.heartbeat.overdue()
            if overdue:
                self.log.error(
                    "watchdog withheld: operations past their time limit", operations=overdue[:5]
                )
            else:
                self.notifier.watchdog()
            await anyio.sleep(interval)

    def status_line(self) -> str:
        backlog = sum(w.backlog for w in self.workers.values())
        broken = sum(1 for w in self.workers.values() if w.broken_code)
        postgres = {True: "up", False: "down", None: "unknown"}[self.postgres_up]
        if self.postgres_refused is not None:
            postgres = f"refusing the work (SQLSTATE {self.postgres_refused})"
        return (
            f"{len(self.workers)} workspaces ({broken} broken), backlog {backlog}, "
            f"PostgreSQL {postgres}"
        )

    def status(self) -> dict[str, Any]:
        now = time.time()
        oldest = [w.oldest_pending for w in self.workers.values() if w.oldest_pending]
        return {
            "pid": os.getpid(),
            "version": __version__,
            "started_at": self.started_at,
            "config": str(self.config_path) if self.config_path else None,
            "postgres": self.config.postgres.host_description(),
            "postgres_up": self.postgres_up,
            "postgres_refused_sqlstate": self.postgres_refused,
            "workspaces": len(self.workers),
            "backlog": sum(w.backlog for w in self.workers.values()),
            "lag_seconds": round(now - min(oldest)) if oldest else 0,
            "reload": self.reload,
            "workspace_status": {
                str(path): {
                    "last_sync": w.last_sync,
                    "backlog": w.backlog,
                    "broken": w.broken_code,
                }
                for path, w in self.workers.items()
            },
            "refused": {
                str(path): f"{error.code}: {error.message}" for path, error in self.refused.items()
            },
        }

    def _write_status(self) -> None:
        status = self.status()
        if status == self._status_written:
            return
        try:
            write_status(self.state_dir, status)
        except OSError as error:
            self.log.warning("cannot write the status file", error=error.strerror)
        self._status_written = status

    async def _status_loop(self) -> None:
        while True:
            status = self.status()
            self.lag_seconds = status["lag_seconds"]
            self.metrics.backlog.set(status["backlog"])
            self.metrics.lag.set(self.lag_seconds)
            self.metrics.pool_in_use.set(self.shared.target.connections_in_use)
            line = self.status_line()
            if line != self._status_line:
                self.notifier.status(line)
                self._status_line = line
            await anyio.to_thread.run_sync(self._write_status)
            with anyio.move_on_after(STATUS_SECONDS):
                await self._status_soon.wait()
            self._status_soon = anyio.Event()


def run_daemon(config_path: Path | None) -> int:
    config = load_config(config_path, os.environ)
    password = config.postgres.resolved_password()
    configure_daemon_logging(config, password)
    tune_interpreter()
    daemon = Daemon(
        config,
        config_path=config_path or config.source,
        environ=os.environ,
        cwd=Path.cwd(),
        password=password,
    )
    lock = hold_state_dir(daemon.state_dir)
    try:
        return anyio.run(daemon.run, backend="asyncio")
    finally:
        os.close(lock)
