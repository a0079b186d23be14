"""The daemon's scheduled verify: each workspace compared with PostgreSQL (acode db verify)
every `daemon.verify_interval_hours`, inside `daemon.verify_window`.

Each day the window (the whole day without one) is cut into periods of the interval (one
period when the interval is longer than the window); a workspace's slot in each period is
at the same fraction of it, taken from a hash of the workspace's path. So a hundred
workspaces are verified one after the other across the window, never all at once, and a
restarted daemon keeps every workspace's slot.

A verify runs beside the workspace's own sync turns: it is built for a moving target (a
record in flight is not compared, and every difference is read again before it is
reported), so it needs no pause of the shipping. It holds one of the limiter's tokens,
since it reads PostgreSQL through the shared pool, and its SQLite reads run in worker
threads (Verifier).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from datetime import time as clock_time
from pathlib import Path
from typing import Any, Final

import anyio

from acode_sync.config import DaemonSettings, parse_window
from acode_sync.errors import AcodeError
from acode_sync.log import get_logger
from acode_sync.verify import LISTED_PER_KIND, Kind, Verifier, VerifyReport
from acode_sync.worker import Shared

DAY_SECONDS: Final = 86400.0
# Sleep at most this long between looks at the wall clock: a suspended machine, or a
# clock set forward, is noticed within this time.
MAX_SLEEP_SECONDS: Final = 60.0
MISMATCH_KINDS: Final = tuple(kind for kind in Kind if kind is not Kind.SUPERSEDED)


def slot_fraction(workspace: Path) -> float:
    """Where in each period this workspace is verified: in [0, 1), fixed by its path."""
    digest = hashlib.sha256(os.fsencode(workspace)).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass(frozen=True, slots=True)
class VerifySchedule:
    interval: float  # seconds
    window_start: int = 0  # minutes after local midnight
    window_minutes: int = 24 * 60

    @classmethod
    def of(cls, settings: DaemonSettings) -> VerifySchedule | None:
        """The schedule of these settings; None when verifying is off."""
        if settings.verify_interval_hours <= 0:
            return None
        interval = settings.verify_interval_hours * 3600
        if not settings.verify_window:
            return cls(interval)
        start, minutes = parse_window(settings.verify_window)
        return cls(interval, start, minutes)

    @property
    def period(self) -> float:
        return min(self.interval, self.window_minutes * 60.0)

    def slots(self, fraction: float, day: date) -> Iterator[float]:
        """The workspace's slots (Unix times) in the window that opens on `day`. The
        window's ends are local times: on a night the clocks change it is an hour longer
        or shorter."""
        hour, minute = divmod(self.window_start, 60)
        opens = datetime.combine(day, clock_time(hour, minute))
        closes = opens + timedelta(minutes=self.window_minutes)
        start, end = opens.astimezone().timestamp(), closes.astimezone().timestamp()
        period = min(self.interval, end - start)
        for k in range(math.ceil((end - start) / period)):
            at = start + (k + fraction) * period
            if at < end:
                yield at

    def next_slot(self, fraction: float, *, after: float, last: float | None = None) -> float:
        """The first slot later than `after` and, when the workspace had a slot at `last`,
        at least one interval after it (a period earlier: the slots repeat per period)."""
        earliest = after if last is None else max(after, last + self.interval - self.period)
        day = datetime.fromtimestamp(earliest).date() - timedelta(days=1)  # may wrap into it
        for _ in range(math.ceil(self.interval / DAY_SECONDS) + 3):
            for slot in self.slots(fraction, day):
                if slot > earliest:
                    return slot
            day += timedelta(days=1)
        raise AssertionError("every window has a slot")  # pragma: no cover


class VerifyScheduler:
    """The daemon's service: verify each watched workspace at its slots and export what
    the last verify found."""

    def __init__(
        self,
        *,
        workspaces: Callable[[], Collection[Path]],
        shared: Callable[[], Shared],
    ) -> None:
        self._workspaces = workspaces
        self._shared = shared
        self._schedule: VerifySchedule | None = None
        self._due: dict[Path, float] = {}  # the next slot of each workspace
        self._running: set[Path] = set()
        self._exported: set[Path] = set()  # workspaces with verify series
        self._wake = anyio.Event()
        self.log = get_logger()

    def wake(self) -> None:
        """Workspaces came or went, or the configuration changed: plan again now."""
        self._wake.set()

    async def run(self) -> None:
        async with anyio.create_task_group() as verifies:
            while True:
                self._plan(time.time())
                now = time.time()
                for workspace, at in list(self._due.items()):
                    if at > now:
                        continue
                    assert self._schedule is not None
                    fraction = slot_fraction(workspace)
                    self._due[workspace] = self._schedule.next_slot(fraction, after=now, last=at)
                    if workspace not in self._running:  # a verify still running skips a slot
                        self._running.add(workspace)
                        verifies.start_soon(self._verify, workspace)
                wait = min([*self._due.values(), now + MAX_SLEEP_SECONDS]) - now
                with anyio.move_on_after(max(wait, 0.0)):
                    await self._wake.wait()
                self._wake = anyio.Event()

    def _plan(self, now: float) -> None:
        schedule = VerifySchedule.of(self._shared().config.daemon)
        metrics = self._shared().metrics
        if schedule != self._schedule:
            self._schedule = schedule
            self._due.clear()
            metrics.verify_interval.set(0 if schedule is None else schedule.interval)
        watched = set(self._workspaces())
        for workspace in set(self._due) - watched:
            del self._due[workspace]
        for workspace in self._exported - watched:
            self._forget(workspace)
        if schedule is None:
            return
        for workspace in watched - set(self._due):
            self._due[workspace] = schedule.next_slot(slot_fraction(workspace), after=now)

    def _forget(self, workspace: Path) -> None:
        metrics = self._shared().metrics
        for kind in MISMATCH_KINDS:
            metrics.verify_mismatches.remove(str(workspace), kind.value)
        metrics.verify_last_success.remove(str(workspace))
        self._exported.discard(workspace)

    async def _verify(self, workspace: Path) -> None:
        shared = self._shared()
        log = self.log.bind(workspace=str(workspace))
        repair = shared.config.daemon.verify_repair
        verifier = Verifier(
            workspace=workspace, target=shared.target, busy_timeout=shared.config.sync.busy_timeout
        )
        try:
            async with shared.limiter:
                started = time.monotonic()
                report = await verifier.run(repair=repair)
        except AcodeError as error:
            shared.metrics.verify_runs.labels("error").inc()
            log.warning("verify failed", code=error.code, error=error.message)
            return
        except Exception as error:  # a bug must not take the daemon down
            shared.metrics.verify_runs.labels("error").inc()
            log.exception("unexpected error in verify", error=type(error).__name__)
            return
        finally:
            self._running.discard(workspace)
        if workspace in self._workspaces():  # not removed meanwhile
            self._export(workspace, report)
        self._log(log, report, time.monotonic() - started)

    def _export(self, workspace: Path, report: VerifyReport) -> None:
        metrics = self._shared().metrics
        found = report.by_kind()
        for kind in MISMATCH_KINDS:
            count = len(found[kind.value])
            metrics.verify_mismatches.labels(str(workspace), kind.value).set(count)
        metrics.verify_last_success.labels(str(workspace)).set(time.time())
        metrics.verify_runs.labels("ok" if report.ok else "mismatch").inc()
        self._exported.add(workspace)

    @staticmethod
    def _log(log: Any, report: VerifyReport, seconds: float) -> None:
        counts = {
            "checked": report.checked,
            "in_flight": report.in_flight,
            "superseded": len(report.by_kind()[Kind.SUPERSEDED.value]),
            "seconds": round(seconds, 2),
        }
        if report.ok:
            log.info("verify ok", **counts)
            return
        found = report.by_kind()
        log.warning(
            "verify found differences",
            differences={k.value: len(found[k.value]) for k in MISMATCH_KINDS if found[k.value]},
            listed=[f"{d.kind.value}: {d.line()}" for d in report.problems[:LISTED_PER_KIND]],
            queued=report.queued,
            **counts,
        )
