"""One workspace's syncer: claim -> apply in PostgreSQL -> mark in SQLite.

A batch is applied in one PostgreSQL transaction; only after it commits is the SQLite
side marked, in one SQLite transaction. A crash in between is harmless: the records are
sent again and PostgreSQL answers "duplicate" (same key, same digest). A record that
PostgreSQL refuses is isolated by bisection, so the rest of its batch still commits.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from collections.abc import Set as AbstractSet
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.to_thread
from anyio.abc import TaskGroup

from acode_sync.config import SyncSettings
from acode_sync.domain import (
    MAX_ID_LENGTH,
    Clock,
    format_timestamp,
    is_canonical_shape,
    parse_timestamp,
    utc_now,
)
from acode_sync.errors import (
    AcodeError,
    BusyError,
    PostgresUnavailableError,
    RecordRejectedError,
    WorkspaceOpenError,
)
from acode_sync.jsonb import payload_digest_as_jsonb
from acode_sync.log import get_logger
from acode_sync.outbox import Failure, Outbox, OutboxRecord
from acode_sync.pg_tables import TABLES
from acode_sync.postgres import (
    BatchOutcome,
    BatchPlan,
    FaultHook,
    PostgresTarget,
    PreparedRecord,
    RecordFailure,
    plan_batch,
)
from acode_sync.retry import RecordRetryPolicy
from acode_sync.workspace import (
    AGENT_DIR,
    FILE_MODE,
    DatabaseId,
    check_workspace_files,
    database_path,
    open_in_agent_dir,
    translated,
)

LOCK_NAME: Final = "sync.lock"
LOCK_POLL_SECONDS: Final = 0.2
# A batch that fails "transiently" this many times in a row while PostgreSQL answers a
# probe is treated as holding a bad record (a statement it always times out on, ...).
SUSPECT_STRIKES: Final = 3
# Pruning and WAL checkpoints run when a drain finds nothing left, at most this often
# (an agent at work, a few saves a second, fills the 1,000 pages of its own automatic
# checkpoint in a few minutes; each checkpoint is an fsync).
MAINTENANCE_SECONDS: Final = 120.0
CHECKPOINT_EVERY_BATCHES: Final = 20
# While PostgreSQL applies a batch, a worker thread prepares the next one. When PostgreSQL
# answers, the event loop must get the GIL back at once to send the next statement:
# Python's default switch interval (5 ms) would leave PostgreSQL idle that long, several
# times per batch.
GIL_SWITCH_INTERVAL: Final = 0.0001


def tune_interpreter() -> None:
    """For a process that syncs: hand the GIL over promptly (see GIL_SWITCH_INTERVAL)."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)


def prepare(
    record: OutboxRecord, *, max_payload_bytes: int, latest: str, skew: timedelta
) -> PreparedRecord:
    """Check a record before shipping (docs/sync.md, what a record must be). `latest`: the
    latest version this syncer ships now (its clock plus `skew`, canonical)."""
    if not record.readable:
        raise RecordRejectedError("a text column of the record is not valid UTF-8")
    if record.entity_type not in TABLES:
        raise RecordRejectedError(f"unknown entity type {record.entity_type[:60]!r}")
    for name, value in (("entity_id", record.entity_id), ("session_id", record.session_id)):
        if value is not None and not 0 < len(value) <= MAX_ID_LENGTH:
            raise RecordRejectedError(
                f"the record's {name} is {len(value)} characters; ids are 1 to "
                f"{MAX_ID_LENGTH} characters"
            )
    payload = record.payload  # PostgreSQL refuses it if it is not UTF-8 JSON
    if len(payload) > max_payload_bytes:
        raise RecordRejectedError(
            f"the payload is {len(payload)} bytes, over max_payload_bytes ({max_payload_bytes})"
        )
    if payload.lstrip(b" \t\r\n")[:1] != b"{":
        raise RecordRejectedError("the payload is not a JSON object")
    if record.session_id is None and _names_no_session(record.entity_type, payload):
        raise RecordRejectedError(
            "the record names no session: neither the outbox record nor its payload has a "
            "session_id (and the workspace knows no parent entity that has one); every "
            "entity but a Session belongs to one"
        )
    key, base = record.idempotency_key, record.base_updated_at
    prefix = f"{record.entity_type}:{record.entity_id}:"
    if not key.startswith(prefix):
        raise RecordRejectedError("the idempotency key is not EntityType:entity_id:timestamp")
    version = key[len(prefix) :]
    for name, stamp in (("idempotency key's time", version), ("base_updated_at", base)):
        if stamp is not None and not is_canonical_shape(stamp):
            raise RecordRejectedError(
                f"the {name} {stamp[:40]!r} is not a canonical RFC 3339 UTC time "
                "(YYYY-MM-DDTHH:MM:SS.ffffffZ)"
            )
    if version > latest and not _follows_its_base(version, base, skew):
        raise RecordRejectedError(
            f"the version {version} is ahead of this machine's clock by more than "
            "sync.max_clock_skew_seconds: it would win every later change; not shipped"
        )
    digest = hashlib.sha256(payload).digest()
    return PreparedRecord(
        record.outbox_id,
        key,
        record.entity_type,
        record.entity_id,
        record.session_id,
        payload,
        version,
        base,
        digest,
        _canonical_digest(record, digest),
    )


def _canonical_digest(record: OutboxRecord, digest: bytes) -> bytes | None:
    """The store's canonical digest while the payload is the one it was computed for (the
    first half of payload_digests is that payload's SHA-256), else computed here."""
    stored = record.payload_digests
    if stored is not None and len(stored) == 64 and stored[:32] == digest:
        return stored[32:]
    return payload_digest_as_jsonb(record.payload)


def _names_no_session(entity_type: str, payload: bytes) -> bool:
    """Certainly no session: not a Session (its id is its session), a JSON object, and no
    top-level session_id in it, the one PostgreSQL reads (p->>'session_id'). Only records
    the outbox gave no session come here (few), so the payload is parsed; one that is
    not JSON is left to PostgreSQL, which refuses it with its own reason."""
    if entity_type == "Session":
        return False
    try:
        document = json.loads(payload)
    except ValueError:
        return False
    return isinstance(document, dict) and document.get("session_id") is None


def _follows_its_base(version: str, base: str | None, skew: timedelta) -> bool:
    """A version ahead of the clock ships if it is within the skew of its base: the store's
    versions only go forward, so after the clock stepped back an entity's next version
    is its previous one plus a microsecond, as far ahead as that one was."""
    if base is None or base >= version:
        return False
    return version <= format_timestamp(parse_timestamp(base) + skew)


def retry_policy(settings: SyncSettings) -> RecordRetryPolicy:
    return RecordRetryPolicy(
        base_seconds=settings.retry_base_seconds,
        cap_seconds=settings.retry_cap_seconds,
        max_attempts=settings.max_attempts,
    )


@dataclass(slots=True)
class SyncSummary:
    applied: int = 0
    duplicates: int = 0
    conflicts: int = 0
    retried: int = 0
    dead: int = 0
    batches: int = 0
    batch_seconds: list[float] = field(default_factory=list)
    drained: bool = False  # stopped because nothing was left to claim
    backlog: int = 0
    oldest_pending: str | None = None
    next_retry_at: str | None = None

    def line(self) -> str:
        return (
            f"applied {self.applied}, duplicates {self.duplicates}, conflicts "
            f"{self.conflicts}, retried {self.retried}, dead {self.dead} "
            f"({self.batches} batches)"
        )


@asynccontextmanager
async def _task_group() -> AsyncIterator[TaskGroup]:
    """A task group that raises its first error itself, not inside an ExceptionGroup:
    callers handle AcodeErrors by class."""
    try:
        async with anyio.create_task_group() as tg:
            yield tg
    except BaseExceptionGroup as group:
        raise group.exceptions[0] from None


@dataclass(slots=True)
class _Batch:
    records: Sequence[OutboxRecord]
    started: float
    ready: list[PreparedRecord] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    plan: BatchPlan | None = None  # built with `ready`, in the worker thread

    def hold_back(self, held: AbstractSet[tuple[str, str]]) -> None:
        """Leave pending the records of entities that have an earlier failed record."""
        self.ready = [r for r in self.ready if (r.entity_type, r.entity_id) not in held]
        self.plan = plan_batch(self.ready)


@dataclass(slots=True)
class _Isolation:
    """What bisecting a refused batch found so far."""

    outcome: BatchOutcome = field(default_factory=BatchOutcome)
    failures: list[Failure] = field(default_factory=list)  # refused for their data
    suspects: list[Failure] = field(default_factory=list)  # a suspect failure, alone

    def failed_entities(self, records: Sequence[PreparedRecord]) -> set[tuple[str, str]]:
        failed = {f.outbox_id for f in (*self.failures, *self.suspects)}
        return {(r.entity_type, r.entity_id) for r in records if r.outbox_id in failed}


@dataclass(frozen=True, slots=True)
class _Shipped:
    """A batch PostgreSQL has answered for, waiting to be marked in SQLite."""

    batch: _Batch
    outcome: BatchOutcome


class SyncLock:
    """One syncer per database file: an exclusive flock on .agent/sync.lock, released by
    the kernel if the holder dies.

    The lock lives beside the database, not on it: SQLite's locks on the database are
    POSIX locks, which this process would drop for all its connections by closing any
    other descriptor of that file. check_workspace_files makes the two equivalent: it
    refuses links and second names, so every path to the database is a path to the same
    `.agent/` directory and its one sync.lock.
    """

    def __init__(self, workspace: Path) -> None:
        self.workspace = workspace
        self.path = workspace / AGENT_DIR / LOCK_NAME
        self._fd: int | None = None
        self.database_id: DatabaseId | None = None  # the database file checked with the lock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        self.database_id = check_workspace_files(self.workspace)
        fd = open_in_agent_dir(self.workspace, LOCK_NAME, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


@dataclass(kw_only=True)
class WorkspaceSyncer:
    workspace: Path
    target: PostgresTarget
    settings: SyncSettings = field(default_factory=SyncSettings)
    clock: Clock = utc_now
    policy: RecordRetryPolicy | None = None
    fault_hook: FaultHook | None = None

    def __post_init__(self) -> None:
        if self.policy is None:
            self.policy = retry_policy(self.settings)
        self.log = get_logger(workspace=str(self.workspace))
        self._strikes: dict[int, int] = {}
        self._open: Outbox | None = None
        self._open_id: DatabaseId | None = None  # the database file `_open` reads
        self.summary = SyncSummary()  # the current (or last) drain's, even if it failed
        self._maintained_at = -math.inf

    def configure(self, target: PostgresTarget, settings: SyncSettings) -> None:
        """New settings (a reload): the next batch uses them."""
        self.target, self.settings, self.policy = target, settings, retry_policy(settings)

    async def drain(
        self,
        *,
        lock_wait: float = 0.0,
        max_batches: int | None = None,
        stop: Callable[[], bool] | None = None,
        keep_open: bool = False,
    ) -> SyncSummary:
        """Ship claimable records until none is left, `max_batches` were shipped or `stop()`
        says so (checked between batches). Raises PostgresUnavailableError on an outage
        (nothing is marked then) and BusyError if another syncer holds the workspace."""
        if not await anyio.to_thread.run_sync(database_path(self.workspace).is_file):
            raise WorkspaceOpenError(f"no workspace database at {database_path(self.workspace)}")
        lock = SyncLock(self.workspace)
        deadline = anyio.current_time() + lock_wait
        # flock has no wake-up to await: poll until the deadline.
        while not await anyio.to_thread.run_sync(translated, lock.path, lock.try_acquire):
            if anyio.current_time() >= deadline:
                break
            await anyio.sleep(LOCK_POLL_SECONDS)
        if not lock.held:
            raise BusyError(
                f"another syncer (the daemon?) is syncing {self.workspace}",
                hint="Wait for it, or stop it first; it ships the same records.",
            )
        self.summary = SyncSummary()
        if self._open is not None and self._open_id != lock.database_id:
            # Replaced under a kept connection (a backup put in place): that connection
            # still reads the old file.
            self.log.info("workspace database replaced: reopening it")
            await self.release()
        try:
            outbox = await self._outbox(lock.database_id)
            return await self._drain(outbox, max_batches, stop)
        except AcodeError:
            await self.release()  # the connection may be what is broken
            raise
        finally:
            lock.release()
            if not keep_open:
                await self.release()

    async def _outbox(self, database_id: DatabaseId | None = None) -> Outbox:
        """The syncer's connection to the workspace, opened on demand; kept between turns
        while the workspace is busy, closed by release() when it goes idle."""
        if self._open is None:

            def open_outbox() -> tuple[DatabaseId, Outbox]:
                checked = database_id or check_workspace_files(self.workspace)
                outbox = Outbox(
                    self.workspace, busy_timeout=self.settings.busy_timeout, clock=self.clock
                )
                return checked, outbox

            self._open_id, opened = await anyio.to_thread.run_sync(open_outbox)
            self._open = opened
            return opened
        return self._open

    @property
    def connection(self) -> Outbox | None:
        """The connection to the workspace, while the syncer holds it (between turns)."""
        return self._open

    @property
    def is_open(self) -> bool:
        return self._open is not None

    async def release(self) -> None:
        outbox, self._open = self._open, None
        if outbox is not None:
            await anyio.to_thread.run_sync(outbox.close)

    async def _drain(
        self, outbox: Outbox, max_batches: int | None, stop: Callable[[], bool] | None
    ) -> SyncSummary:
        """A pipeline: while PostgreSQL applies batch N, the SQLite side marks batch N-1
        and claims batch N+1 (one connection, one thread at a time)."""
        summary = self.summary
        # A pass claims from the oldest record on. Records held back behind a failed record
        # of their entity were skipped by the pass: once that failure is marked (a backoff,
        # or a dead letter that frees them) a new pass decides again.
        while await self._pass(outbox, max_batches, stop):
            pass
        stopped = max_batches is not None and summary.batches >= max_batches
        if not stopped and not (stop is not None and stop()):
            await self._maybe_maintain(outbox, summary)
        backlog = await anyio.to_thread.run_sync(outbox.backlog)
        summary.backlog, summary.oldest_pending, summary.next_retry_at = backlog
        return summary

    async def _pass(
        self, outbox: Outbox, max_batches: int | None, stop: Callable[[], bool] | None
    ) -> bool:
        """One pipelined pass; True if it held records back and may run again."""
        summary = self.summary
        held: set[tuple[str, str]] = set()  # entities with a failed record: keep order
        batch = await anyio.to_thread.run_sync(self._claim_batch, outbox, 0, held)
        shipped: _Shipped | None = None
        more = True
        try:
            while batch.records:
                # Batches claimed so far: those marked, the one still to mark, this one.
                claimed_so_far = summary.batches + (shipped is not None) + 1
                more = max_batches is None or claimed_so_far < max_batches
                more = more and not (stop is not None and stop())
                after = batch.records[-1].outbox_id
                claimed: list[_Batch] = [_Batch(records=(), started=0.0)]
                async with _task_group() as tg:
                    tg.start_soon(self._sqlite_side, outbox, shipped, more, after, held, claimed)
                    shipped = None  # marked by the task above, even if the apply fails
                    outcome, rejected = await self._apply_isolating(
                        outbox.origin_id, batch.ready, plan=batch.plan
                    )
                batch.failures += rejected
                if batch.failures:
                    failed = {f.outbox_id for f in batch.failures}
                    held |= {
                        (r.entity_type, r.entity_id) for r in batch.records if r.outbox_id in failed
                    }
                    # The next batch was prepared before these failures were known.
                    claimed[0].hold_back(held)
                batch.plan = None  # applied: its statement arguments are not needed again
                shipped = _Shipped(batch, outcome)
                batch = claimed[0]
        finally:
            if shipped is not None:
                with anyio.CancelScope(shield=True):
                    await self._mark(outbox, shipped)
        return more and bool(held)

    async def _sqlite_side(
        self,
        outbox: Outbox,
        shipped: _Shipped | None,
        claim_more: bool,
        after: int,
        held: set[tuple[str, str]],
        claimed: list[_Batch],
    ) -> None:
        with anyio.CancelScope(shield=True):  # a batch PostgreSQL committed is always marked
            if shipped is not None:
                await self._mark(outbox, shipped)
                if self.summary.batches % CHECKPOINT_EVERY_BATCHES == 0:
                    # A long drain checkpoints as it goes, so the agent's own automatic
                    # checkpoint (a slow save) stays rare.
                    await anyio.to_thread.run_sync(outbox.checkpoint)
        if claim_more:
            claimed[0] = await anyio.to_thread.run_sync(
                self._claim_batch, outbox, after, frozenset(held)
            )

    async def _maybe_maintain(self, outbox: Outbox, summary: SyncSummary) -> None:
        """Nothing left to claim: prune and checkpoint, at most every MAINTENANCE_SECONDS."""
        if time.monotonic() - self._maintained_at >= MAINTENANCE_SECONDS:
            await anyio.to_thread.run_sync(self._maintain, outbox)
            self._maintained_at = time.monotonic()
        summary.drained = True

    async def backlog(self) -> tuple[int, str | None, str | None]:
        """(pending records, oldest created_at, earliest retry time), read only."""
        outbox = await self._outbox()
        return await anyio.to_thread.run_sync(outbox.backlog)

    async def has_work(self) -> bool:
        """Is any record claimable now? A read only: it takes no lock and writes nothing,
        so checking never wakes a watcher."""
        outbox = await self._outbox()
        return bool(
            await anyio.to_thread.run_sync(lambda: outbox.claim(max_records=1, max_bytes=1))
        )

    def _claim_batch(
        self, outbox: Outbox, after: int, held: AbstractSet[tuple[str, str]]
    ) -> _Batch:
        """Claim and prepare the next batch, in a worker thread, while PostgreSQL applies
        the one before."""
        records = outbox.claim(
            max_records=self.settings.batch_max_records,
            max_bytes=self.settings.batch_max_bytes,
            after=after,
            with_blocked=True,
        )
        return self._prepare(records, held)

    def _maintain(self, outbox: Outbox) -> None:
        """Off the agent's save path: prune old processed records, checkpoint the WAL."""
        outbox.prune(timedelta(days=self.settings.retention_days))
        outbox.checkpoint()

    def _prepare(
        self, records: Sequence[OutboxRecord], held: AbstractSet[tuple[str, str]]
    ) -> _Batch:
        """Check each record; one that fails holds back the later records of its entity."""
        batch = _Batch(records=records, started=time.perf_counter())
        held = set(held)
        skew = timedelta(seconds=self.settings.max_clock_skew_seconds)
        latest = format_timestamp(self.clock() + skew)
        for record in records:
            entity = (record.entity_type, record.entity_id)
            if record.blocked or entity in held:
                continue  # stays pending: an earlier record of this entity waits or failed
            try:
                batch.ready.append(
                    prepare(
                        record,
                        max_payload_bytes=self.settings.max_payload_bytes,
                        latest=latest,
                        skew=skew,
                    )
                )
            except AcodeError as error:
                batch.failures.append(Failure(record.outbox_id, error.message))
                held.add(entity)
        batch.plan = plan_batch(batch.ready)
        return batch

    async def _mark(self, outbox: Outbox, shipped: _Shipped) -> None:
        """After PostgreSQL committed: move the mark past the batch and record what stays
        pending or failed, in one short SQLite transaction (Outbox.mark)."""
        batch, outcome = shipped.batch, shipped.outcome
        delivered = {r.outbox_id for r in outcome.delivered}
        failed = {f.outbox_id for f in batch.failures}
        past_mark = [r.outbox_id for r in batch.records if not r.tracked]
        policy = self.policy
        assert policy is not None
        results = await anyio.to_thread.run_sync(
            lambda: outbox.mark(
                [r for r in batch.records if r.tracked and r.outbox_id in delivered],
                batch.failures,
                policy,
                claimed={r.outbox_id: r for r in batch.records},
                # Left pending (held back or blocked) as the mark passes them.
                held=[i for i in past_mark if i not in delivered and i not in failed],
                through=max(past_mark, default=None),
            )
        )
        if self.fault_hook is not None:
            self.fault_hook("after_mark")
        self._report(batch.records, outcome, results, batch.failures, self.summary, batch.started)

    def _report(
        self,
        records: Sequence[OutboxRecord],
        outcome: BatchOutcome,
        results: Sequence[Any],
        failures: Sequence[Failure],
        summary: SyncSummary,
        started: float,
    ) -> None:
        errors = {f.outbox_id: f.error for f in failures}
        keys = {r.outbox_id: r.idempotency_key for r in records} if results else {}
        for record in outcome.applied:
            self.log.debug("applied", idempotency_key=record.idempotency_key)
        for record in outcome.duplicates:
            # At debug: a resend storm (a restored backup) would flood the log at info;
            # the batch line, the summary line and the metric count them.
            self.log.debug("duplicate", idempotency_key=record.idempotency_key)
        for c in outcome.conflicts:
            self.log.warning(
                "conflict",
                conflict_id=c.conflict_id,
                idempotency_key=c.incoming_key,
                current_key=c.current_key,
                incoming_updated_at=format_timestamp(c.incoming_updated_at),
                current_updated_at=format_timestamp(c.current_updated_at),
                incoming_origin=c.incoming_origin,
                current_origin=c.current_origin,
                winner=c.winner,
            )
        for result in results:
            fields = {
                "idempotency_key": keys[result.outbox_id],
                "outbox_id": result.outbox_id,
                "attempts": result.attempts,
                "error": errors[result.outbox_id],
            }
            if result.dead:
                self.log.error("dead letter", **fields)
            else:
                self.log.warning("retry", **fields)
        dead = sum(1 for r in results if r.dead)
        summary.applied += len(outcome.applied)
        summary.duplicates += len(outcome.duplicates)
        summary.conflicts += len(outcome.conflicts)
        summary.retried += len(results) - dead
        summary.dead += dead
        summary.batches += 1
        summary.batch_seconds.append(time.perf_counter() - started)
        self.log.debug(  # at info, one line per save of an interactive agent
            "batch",
            first_outbox_id=records[0].outbox_id,
            last_outbox_id=records[-1].outbox_id,
            records=len(records),
            applied=len(outcome.applied),
            duplicates=len(outcome.duplicates),
            conflicts=len(outcome.conflicts),
            failed=len(results),
            seconds=round(time.perf_counter() - started, 4),
        )

    async def _is_suspect(self, records: Sequence[PreparedRecord]) -> bool:
        """A suspect failure (a statement timeout ...), yet PostgreSQL answers a probe: a
        strike against this batch; the third in a row isolates its records."""
        if not await self.target.probe():
            return False
        first = records[0].outbox_id
        self._strikes[first] = self._strikes.get(first, 0) + 1
        if self._strikes[first] < SUSPECT_STRIKES:
            return False
        del self._strikes[first]
        self.log.warning(
            "batch keeps failing while PostgreSQL answers: isolating its records",
            first_outbox_id=first,
            records=len(records),
        )
        return True

    async def _apply_isolating(
        self, origin_id: str, records: Sequence[PreparedRecord], *, plan: BatchPlan | None = None
    ) -> tuple[BatchOutcome, list[Failure]]:
        """Apply a batch. If PostgreSQL refuses its data (or a suspect failure keeps
        coming back), bisect until each bad record stands alone: O(log n) extra
        transactions per bad record; the good ones commit. The server's own state never
        charges a record: a suspect failure is charged to a record only if it follows that
        record sent alone while the server took other work (docs/sync.md)."""
        if not records:
            return BatchOutcome(), []
        try:
            plan = plan_batch(records) if plan is None else plan
            outcome = await self.target.apply(origin_id, plan, fault_hook=self.fault_hook)
        except RecordFailure as error:
            reason, suspect = error.reason, False
        except PostgresUnavailableError as error:
            if not error.suspect or not await self._is_suspect(records):
                raise
            reason, suspect = error.message, True
        else:
            self._strikes.pop(records[0].outbox_id, None)
            return outcome, []
        isolation = _Isolation()
        await self._isolate(origin_id, records, reason, suspect, isolation)
        if isolation.suspects and not (isolation.outcome.delivered or isolation.failures):
            # Every record fails alone, and nothing shows that the server takes writes.
            raise PostgresUnavailableError(
                f"every record of a batch fails alone ({reason}): the server's state, not "
                "a record's; nothing was charged"
            )
        return isolation.outcome, isolation.failures + isolation.suspects

    async def _isolate(
        self,
        origin_id: str,
        records: Sequence[PreparedRecord],
        reason: str,
        suspect: bool,
        isolation: _Isolation,
    ) -> None:
        """`records` failed together with `reason`: apply each half apart. A record that
        fails alone holds back the later records of its entity (their order is kept)."""
        if len(records) == 1:
            failures = isolation.suspects if suspect else isolation.failures
            failures.append(Failure(records[0].outbox_id, reason))
            return
        middle = len(records) // 2
        for half in (records[:middle], records[middle:]):
            failed = isolation.failed_entities(records)
            half = [r for r in half if (r.entity_type, r.entity_id) not in failed]
            if not half:
                continue
            try:
                outcome = await self.target.apply(
                    origin_id, plan_batch(half), fault_hook=self.fault_hook
                )
            except RecordFailure as error:
                await self._isolate(origin_id, half, error.reason, False, isolation)
            except PostgresUnavailableError as error:
                if not error.suspect:
                    raise
                await self._isolate(origin_id, half, error.message, True, isolation)
            else:
                isolation.outcome.extend(outcome)
