"""Retention of the central tables that grow with every change, by whole partitions.

applied_keys (one partition per UTC day) and conflicts (one per UTC month) are
range-partitioned by the version time their rows carry (migration 0007). The partitions
are kept by acode_sync/partitions.py: created ahead, dropped whole past retention
(docs/postgres.md#retention). What this module adds: the two tables' specs, the count of
rows a drop forgets, and forgetting the DEFAULT partition's rows older than the cutoff
(versions older than every partition: few).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

import asyncpg

from acode_sync.config import SyncSettings
from acode_sync.partitions import PartitionSpec, Period, drop_expired, ensure, list_partitions
from acode_sync.sql import queries

_Q = queries("postgres")
SCHEMA: Final = "acode"
KEY_RETENTION_FACTOR: Final = 2
LOCK_TIMEOUT_MS: Final = 2000


@dataclass(frozen=True, slots=True)
class PartitionedTable:
    table: str
    column: str
    period: Period
    ahead: int  # periods created ahead of the current one

    def spec(self, retention: timedelta) -> PartitionSpec:
        return PartitionSpec(
            SCHEMA, self.table, self.column, self.period, retention, ahead=self.ahead
        )


APPLIED_KEYS: Final = PartitionedTable("applied_keys", "version", Period.DAY, ahead=3)
CONFLICTS: Final = PartitionedTable("conflicts", "incoming_updated_at", Period.MONTH, ahead=2)
# Partitions are made from this far back: the oldest period a drain still writes into
# often (a workspace offline for a day or two); older versions go to the DEFAULT one.
MADE_BACK: Final = timedelta(days=2)


def plans(sync: SyncSettings) -> list[tuple[PartitionedTable, float | None]]:
    """What the retention keeps, in days, per table (None: forever): applied keys twice as
    long as the outboxes keep processed records (a record resent from any outbox is still
    found), conflicts only as long as sync.conflict_retention_days asks, when set. Kept
    forever, a table still gets its partitions made ahead (else every later row would
    land in the DEFAULT partition)."""
    conflicts = sync.conflict_retention_days
    return [
        (APPLIED_KEYS, sync.retention_days * KEY_RETENTION_FACTOR),
        (CONFLICTS, conflicts if conflicts > 0 else None),
    ]


def cutoff(days: float | None, now: datetime) -> datetime | None:
    """The time before which a table's rows are forgotten (None: kept forever)."""
    return None if days is None else now - timedelta(days=days)


async def prune(
    conn: asyncpg.Connection, table: PartitionedTable, before: datetime | None, now: datetime
) -> int:
    """Drop `table`'s partitions wholly before `before`, forget the DEFAULT partition's
    rows before it, and make the partitions from just before `now` through the ones
    ahead; returns the rows forgotten (counted before the drop: a read, not a write)."""
    spec = table.spec(MADE_BACK)
    forgotten = 0
    async with conn.transaction():
        # DETACH PARTITION waits for the batches writing the table, and every batch then
        # waits for it: give up soon (55P03, tried again next time) rather than stall them.
        await conn.execute(_Q["retention_lock_timeout"], str(LOCK_TIMEOUT_MS))
        if before is None:  # kept forever: only the partitions ahead
            await ensure(conn, spec, now=now)
            return 0
        for partition in await list_partitions(conn, spec):
            if partition.end is not None and partition.end <= before:
                count = _Q["count_partition"].replace("<partition>", partition.name)
                forgotten += int(await conn.fetchval(count))
        await drop_expired(conn, spec, now=before + spec.retention)
        status = await conn.execute(
            _Q["forget_default_rows"]
            .replace("<default>", spec.default_name)
            .replace("<column>", table.column),
            before,
        )
        forgotten += int(str(status).rsplit(" ", 1)[-1])
        await ensure(conn, spec, now=now)
    return forgotten
