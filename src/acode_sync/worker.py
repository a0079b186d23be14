"""One workspace's worker task in the daemon: wait for a wake-up, ship, back off.

A worker never lets an error out: a broken workspace is logged with its code, counted,
and retried later; an outage backs off the workspace without touching any record's
attempts. Idle (a few seconds after its last turn), it holds no connection, no thread and
no open file of the workspace.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import anyio
import anyio.to_thread
from anyio.abc import TaskStatus

from acode_sync.config import Config, gather_seconds
from acode_sync.domain import parse_timestamp
from acode_sync.errors import (
    AcodeError,
    BusyError,
    PostgresMigrationError,
    PostgresRefusedError,
    PostgresSchemaMismatchError,
    PostgresUnavailableError,
    WorkspaceNotCreatedError,
    WorkspaceOpenError,
)
from acode_sync.log import get_logger
from acode_sync.metrics import Metrics
from acode_sync.postgres import PostgresTarget
from acode_sync.retry import OutageBackoff
from acode_sync.sync import SyncSummary, WorkspaceSyncer

# An idle worker closes its workspace's connection once no write came for this long.
IDLE_RELEASE_SECONDS: Final = 5.0
# A database file with no schema yet is tried again this often, for this long, before it
# counts as broken: its agent creates the schema in a transaction of its own, which a
# worker that found the new file at once may not see committed yet.
NEW_WORKSPACE_RETRY_SECONDS: Final = 0.5
NEW_WORKSPACE_GRACE_SECONDS: Final = 60.0


@dataclass
class Shared:
    """What every worker reads from the supervisor; replaced as a whole on reload."""

    config: Config
    target: PostgresTarget
    metrics: Metrics
    limiter: anyio.CapacityLimiter
    on_postgres: Callable[[bool, str | None], None]
    watchdog: Heartbeat
    on_backlog: Callable[[], None] = lambda: None  # a worker's backlog was read afresh


@dataclass
class Heartbeat:
    """Operations in flight with their deadlines: the watchdog is withheld only when one
    is past its own time limit (the daemon is wedged), never for a slow but bounded wait."""

    running: dict[int, tuple[str, float]] = field(default_factory=dict)
    _next: int = 0

    def start(self, name: str, limit: float) -> int:
        self._next += 1
        self.running[self._next] = (name, time.monotonic() + limit)
        return self._next

    def finish(self, token: int) -> None:
        self.running.pop(token, None)

    def overdue(self) -> list[str]:
        now = time.monotonic()
        return [name for name, deadline in self.running.values() if now > deadline]


@dataclass
class PeriodCounts:
    """What a workspace shipped since its last `sync summary` line."""

    batches: int = 0
    applied: int = 0
    duplicates: int = 0
    conflicts: int = 0
    failed: int = 0
    dead: int = 0

    def add(self, summary: SyncSummary) -> None:
        self.batches += summary.batches
        self.applied += summary.applied
        self.duplicates += summary.duplicates
        self.conflicts += summary.conflicts
        self.failed += summary.retried + summary.dead
        self.dead += summary.dead


def _unix(timestamp: str | None) -> float | None:
    return None if timestamp is None else parse_timestamp(timestamp).timestamp()


class WorkspaceWorker:
    def __init__(self, workspace: Path, shared: Shared) -> None:
        self.workspace = workspace
        self.shared = shared
        self.log = get_logger(workspace=str(workspace))
        self.syncer = WorkspaceSyncer(workspace=workspace, target=shared.target)
        self.outage = OutageBackoff()
        self.update(shared)
        self.backlog = 0
        self.oldest_pending: float | None = None  # unix time of the oldest pending record
        self.last_sync: float | None = None
        self.broken_code: str | None = None
        self.next_retry: float | None = None  # unix time a record's backoff ends
        self.waiting_out_outage = False
        self._first_seen_empty: float | None = None  # monotonic; a database with no schema yet
        self.period = PeriodCounts()
        self._period_started = time.monotonic()
        self._wake = anyio.Event()
        self._stopping = False
        self._force = False
        self._rng = random.Random()  # noqa: S311 - jitter, not secrets

    def is_stopping(self) -> bool:
        return self._stopping

    def notify_change(self) -> None:
        """The workspace's files changed: maybe a commit of an agent, maybe our own."""
        self._wake.set()

    def sync_now(self) -> None:
        """Skip the current wait (an idle sleep or an outage backoff)."""
        self._force = True
        self._wake.set()

    def resume_after_outage(self) -> None:
        """PostgreSQL answers again: end an outage wait now (any other wait is kept)."""
        if self.waiting_out_outage:
            self.sync_now()

    def log_summary(self) -> None:
        """One info line for what was shipped since the last one; none if nothing was."""
        now = time.monotonic()
        period, self.period = self.period, PeriodCounts()
        seconds, self._period_started = now - self._period_started, now
        if period.batches == 0 and period.failed == 0:
            return
        self.log.info(
            "sync summary",
            seconds=round(seconds, 1),
            batches=period.batches,
            applied=period.applied,
            duplicates=period.duplicates,
            conflicts=period.conflicts,
            failed=period.failed,
            dead=period.dead,
            backlog=self.backlog,
        )

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    def update(self, shared: Shared) -> None:
        self.shared = shared
        sync = shared.config.sync
        self.syncer.configure(shared.target, sync)
        self.outage.base_seconds = sync.outage_base_seconds
        self.outage.cap_seconds = sync.outage_cap_seconds

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        delay: float | None = 0.0
        try:
            await self._refresh_backlog()  # in the status from the moment it is known
            self.shared.on_backlog()
            while not self.is_stopping():
                if delay is None:
                    if await self._idle():
                        await self._gather()
                elif delay > 0:
                    await self.syncer.release()  # waiting holds no connection either
                    await self._sleep(delay, wake_on_change=False)
                self.waiting_out_outage = False
                if self.is_stopping():
                    break
                delay = await self._turn()
        finally:
            with anyio.CancelScope(shield=True):
                await self.syncer.release()
            self._set_broken(None, quietly=True)
            self.log_summary()

    async def _sleep(self, seconds: float, *, wake_on_change: bool) -> None:
        """Until the time is up, sync_now()/stop(), or (if asked) a change of the files.
        A change that does not end the wait still refreshes the backlog: records written
        during an outage count at once. The read's connection is closed again, so that
        the writer's last close (its checkpoint) is seen as a change too."""
        deadline = anyio.current_time() + seconds
        while not (self._stopping or self._force):
            with anyio.move_on_at(deadline):
                await self._wake.wait()
            self._wake = anyio.Event()
            if wake_on_change or anyio.current_time() >= deadline:
                break
            if not (self._stopping or self._force):
                await self._refresh_backlog()
                await self.syncer.release()
        self._force = False

    async def _idle(self) -> bool:
        """Sleep until there is work: a change of the files (checked with a read, which
        writes nothing, so the daemon's own commits cannot keep it busy), a record's
        backoff running out, or the slow periodic sweep. True if the read found work;
        False for sync_now(), stop() or a read that failed."""
        while not self.is_stopping():
            sweep = self.shared.config.daemon.sweep_seconds * self._rng.uniform(0.8, 1.0)
            if self.next_retry is not None:
                sweep = min(sweep, max(0.0, self.next_retry - time.time()))
            forced = self._force
            if not self._wake.is_set():
                sweep = await self._linger(sweep)
            await self._sleep(sweep, wake_on_change=True)
            if forced or self.is_stopping():
                return False
            try:
                if await self.syncer.has_work():
                    await self._refresh_backlog()  # true while the turn waits or fails
                    return True
            except AcodeError:
                return False  # let a turn report it
        return False

    async def _linger(self, seconds: float) -> float:
        """Keep the workspace's connection for a moment after a turn: an agent at work
        writes again within seconds, and opening the workspace costs more than a small
        batch. Closed if no change comes in that moment (idle: no open connection, no open
        file). Returns what is left of `seconds` to sleep (0 once something woke it)."""
        if not self.syncer.is_open:
            return seconds
        linger = min(seconds, IDLE_RELEASE_SECONDS)
        with anyio.move_on_after(linger):
            await self._wake.wait()
            return 0.0
        await self.syncer.release()
        return seconds - linger

    async def _gather(self) -> None:
        """An interactive agent saves a record at a time: wait `gather_seconds` for the
        saves that follow, so that they ship as one batch, not a batch (a PostgreSQL
        transaction) each. Changes do not end the wait; sync_now() and stop() do, and a
        full batch pending skips it."""
        config = self.shared.config
        seconds = gather_seconds(config)
        if seconds <= 0 or self.backlog >= config.sync.batch_max_records:
            return
        with anyio.move_on_after(seconds):
            while not (self._stopping or self._force):
                await self._wake.wait()
                self._wake = anyio.Event()
        self._force = False

    async def _turn(self) -> float | None:
        """Ship up to batches_per_turn batches. Returns seconds to wait before the next
        turn (0: more work), or None when the workspace is drained."""
        shared = self.shared
        config = shared.config
        limit = (config.postgres.statement_timeout + config.postgres.connect_timeout) * 2
        limit = limit * config.daemon.batches_per_turn + config.sync.busy_timeout + 60
        async with shared.limiter:
            token = shared.watchdog.start(f"sync {self.workspace}", limit)
            empty = False  # the database has no schema yet
            try:
                summary = await self.syncer.drain(
                    max_batches=config.daemon.batches_per_turn,
                    stop=self.is_stopping,
                    keep_open=True,
                )
            except (
                PostgresUnavailableError,
                PostgresSchemaMismatchError,
                PostgresMigrationError,
            ) as error:
                self._count(self.syncer.summary)  # batches applied before the outage
                refused = error.sqlstate if isinstance(error, PostgresRefusedError) else None
                self.waiting_out_outage = True  # before the news: a recovery may follow at once
                shared.on_postgres(False, refused)
                shared.metrics.batch_errors.inc()
                await self._refresh_backlog()
                delay = self.outage.next_delay()
                self.log.warning(
                    "postgres refused" if refused else "postgres unavailable",
                    code=error.code,
                    error=error.message,
                    retry_in_seconds=round(delay, 1),
                )
                return delay
            except BusyError:
                return 1.0  # another syncer (acode db sync) holds the workspace
            except WorkspaceNotCreatedError as error:
                empty = True
                if self._first_seen_empty is None:
                    self._first_seen_empty = time.monotonic()
                    self.log.info(
                        "workspace has no schema yet",
                        error=error.message,
                        broken_after_seconds=NEW_WORKSPACE_GRACE_SECONDS,
                    )
                if time.monotonic() - self._first_seen_empty < NEW_WORKSPACE_GRACE_SECONDS:
                    return NEW_WORKSPACE_RETRY_SECONDS  # its agent is creating it
                self._set_broken(error)
                return config.daemon.broken_retry_seconds
            except AcodeError as error:
                self._count(self.syncer.summary)
                self._set_broken(error)
                return config.daemon.broken_retry_seconds
            except Exception as error:  # a bug must not take the other workspaces down
                self.log.exception("unexpected error", error=type(error).__name__)
                await self.syncer.release()
                self._set_broken(WorkspaceOpenError(f"unexpected {type(error).__name__}"))
                return config.daemon.broken_retry_seconds
            finally:
                shared.watchdog.finish(token)
                if not empty:  # the schema was there (whatever else happened)
                    self._first_seen_empty = None
        self._record(summary)
        if self.outage.failures:
            self.log.info("postgres reachable again", after_failures=self.outage.failures)
            self.outage.reset()
        self._set_broken(None)
        return None if summary.drained else 0.0

    async def _refresh_backlog(self) -> None:
        """Keep backlog and lag true while nothing can be shipped."""
        try:
            self.backlog, oldest, _ = await self.syncer.backlog()
        except AcodeError:
            return
        self.oldest_pending = _unix(oldest)

    def _record(self, summary: SyncSummary) -> None:
        self._count(summary)
        self.backlog = summary.backlog
        self.oldest_pending = _unix(summary.oldest_pending)
        self.next_retry = _unix(summary.next_retry_at)

    def _count(self, summary: SyncSummary) -> None:
        metrics = self.shared.metrics
        self.period.add(summary)
        if summary.batches:
            self.shared.on_postgres(True, None)
            self.last_sync = time.time()
            metrics.last_sync.set(self.last_sync)
        metrics.records.labels("applied").inc(summary.applied)
        metrics.records.labels("duplicate").inc(summary.duplicates)
        metrics.records.labels("conflict").inc(summary.conflicts)
        metrics.conflicts.inc(summary.conflicts)
        metrics.retries.inc(summary.retried)
        metrics.dead_letters.inc(summary.dead)
        for seconds in summary.batch_seconds:
            metrics.batch_duration.observe(seconds)

    def _set_broken(self, error: AcodeError | None, *, quietly: bool = False) -> None:
        metrics = self.shared.metrics
        code = None if error is None else error.code
        if code == self.broken_code:
            return
        if self.broken_code is not None:
            metrics.workspaces_broken.labels(self.broken_code).dec()
            metrics.workspace_broken.remove(str(self.workspace), self.broken_code)
            if not quietly:
                self.log.info("workspace recovered", code=self.broken_code)
        if error is not None:
            metrics.workspaces_broken.labels(error.code).inc()
            metrics.workspace_broken.labels(str(self.workspace), error.code).set(1)
            self.log.error(
                "workspace broken",
                code=error.code,
                error=error.message,
                retry_in_seconds=self.shared.config.daemon.broken_retry_seconds,
            )
        self.broken_code = code
