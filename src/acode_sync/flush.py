"""`acode db flush`: wait until every record committed before the call is in PostgreSQL.

The outbox's largest id at the call is the target. While no other syncer holds the
workspace's sync lock, flush ships the records itself (the same drain as `acode db sync`);
while one does (the daemon), it waits for that syncer and reads the outbox's progress,
read-only, until every record up to the target is processed. A dead record among them
fails the flush at once; so does the timeout, with the number still pending.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import anyio
import anyio.to_thread

from acode_sync.config import SyncSettings
from acode_sync.errors import (
    AcodeError,
    BusyError,
    PostgresUnavailableError,
    RecordRejectedError,
)
from acode_sync.postgres import PostgresTarget
from acode_sync.sql import queries
from acode_sync.sync import WorkspaceSyncer
from acode_sync.workspace import DIALECT, OpenOptions, database_path, open_workspace, translated

DEFAULT_TIMEOUT: Final = 60.0
POLL_SECONDS: Final = 0.2
_Q = queries(DIALECT)


@dataclass(frozen=True, slots=True)
class FlushResult:
    through: int  # the largest outbox id at the call: every record up to it is shipped
    shipped_here: bool  # this call ran a drain itself (else another syncer shipped them)
    seconds: float

    def line(self) -> str:
        by = "shipped by this command" if self.shipped_here else "shipped by the running syncer"
        return f"flushed: every record up to outbox id {self.through} is in PostgreSQL ({by})"


class _Progress:
    """Read-only reads of the outbox, on a connection of their own."""

    def __init__(self, workspace: Path) -> None:
        self.path = database_path(workspace)
        self.conn = open_workspace(workspace, OpenOptions(), create=False, run_migrations=False)

    def last_id(self) -> int:
        return int(translated(self.path, self._one, _Q["last_outbox_id"], {})[0])

    def left(self, through: int) -> tuple[int, int]:
        """(pending, dead) among the records up to `through`."""
        pending, dead = translated(self.path, self._one, _Q["flush_progress"], {"through": through})
        return int(pending), int(dead)

    def _one(self, query: str, params: dict[str, int]) -> sqlite3.Row:
        row: sqlite3.Row = self.conn.execute(query, params).fetchone()
        return row

    def close(self) -> None:
        self.conn.close()


async def flush(
    workspace: Path,
    target: PostgresTarget,
    settings: SyncSettings | None = None,
    *,
    max_wait: float = DEFAULT_TIMEOUT,
    poll: float = POLL_SECONDS,
) -> FlushResult:
    """Return once every outbox record committed before the call is in PostgreSQL.

    Raises RecordRejectedError (ACODE-DB-006) if one of them is a dead letter. On timeout,
    naming the number still pending: PostgresUnavailableError (ACODE-DB-005) if PostgreSQL
    could not be reached (by this command, or by the syncer holding the lock),
    RecordRejectedError if they wait for a retry after PostgreSQL refused them, else
    BusyError (ACODE-DB-004)."""
    started = anyio.current_time()
    deadline = started + max_wait
    progress = await anyio.to_thread.run_sync(_Progress, workspace)
    syncer = WorkspaceSyncer(
        workspace=workspace, target=target, settings=settings or SyncSettings()
    )
    shipped_here = False
    stalled = _Stall()  # this command shipping; a drain cut off by the deadline keeps it
    try:
        through = await anyio.to_thread.run_sync(progress.last_id)
        while True:
            pending, dead = await anyio.to_thread.run_sync(progress.left, through)
            if dead:
                raise RecordRejectedError(
                    f"{dead} record(s) committed before the flush are dead letters and "
                    f"will not be shipped ({pending} still pending)",
                    hint="See them with `acode db outbox list --failed`; fix the cause and "
                    "replay them with `acode db outbox retry`, then flush again.",
                )
            if not pending:
                return FlushResult(through, shipped_here, anyio.current_time() - started)
            if anyio.current_time() >= deadline:
                raise await stalled.error(target, max_wait, pending)
            with anyio.move_on_after(deadline - anyio.current_time()):
                try:
                    await syncer.drain()
                    shipped_here = True
                    stalled = _Stall(next_retry=syncer.summary.next_retry_at)
                except BusyError:
                    stalled = _Stall(busy=True)  # another syncer (the daemon): wait for it
                except PostgresUnavailableError as error:
                    stalled = _Stall(outage=error)
            await anyio.sleep(min(poll, max(0.0, deadline - anyio.current_time())))
    finally:
        await anyio.to_thread.run_sync(progress.close)


@dataclass(frozen=True, slots=True)
class _Stall:
    """What held the records back at the last try: the timeout's error says it."""

    busy: bool = False  # another syncer held the sync lock
    outage: PostgresUnavailableError | None = None
    next_retry: str | None = None  # shipped what it could; the rest wait for their retry

    async def error(self, target: PostgresTarget, waited_for: float, pending: int) -> AcodeError:
        waited = f"flush timed out after {waited_for:g} s: {pending} record(s) still pending"
        if self.outage is not None:
            return PostgresUnavailableError(f"{waited}; {self.outage.message}")
        if self.busy and not await target.probe():
            # A syncer waits for PostgreSQL inside its turn (connecting, a failover)
            # while holding the lock; between turns it waits without it.
            return PostgresUnavailableError(
                f"{waited}; another syncer (the daemon?) holds the workspace's sync lock and "
                f"is waiting for PostgreSQL at {target.description}, which does not answer",
                hint="The records stay queued and ship once PostgreSQL answers; "
                "`acode db status` shows the daemon's view. Flush again then.",
            )
        if self.busy or self.next_retry is None:
            holder = "another syncer (the daemon?) holds the workspace's sync lock and is"
            return BusyError(
                f"{waited}; {holder if self.busy else 'this command was'} still shipping them",
                hint="The records stay queued and ship later. Check the daemon "
                "(`acode db status`) and flush again with a longer --timeout.",
            )
        return RecordRejectedError(
            f"{waited}; they wait behind records PostgreSQL refused, retried with a backoff "
            f"(the next attempt at {self.next_retry})",
            hint="See the failures with `acode db outbox list --failed`; they are retried by "
            "themselves. Fix the cause, or flush again with a longer --timeout.",
        )
