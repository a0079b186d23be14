"""Retention of the central tables that grow with every change, by whole partitions.

applied_keys (one partition per UTC day) and conflicts (one per UTC month) are
range-partitioned by the version time their rows carry (migration 0007). Maintenance
creates the partitions ahead and drops the ones past retention; no row is ever deleted
from a partition (docs/postgres.md#retention). The work is done by two SECURITY DEFINER
functions of the schema, so a syncer role runs it without owning the tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

import asyncpg

from acode_sync.sql import queries

_Q = queries("postgres")


@dataclass(frozen=True, slots=True)
class PartitionedTable:
    table: str
    period: str  # "day" or "month": one partition per UTC day or month
    ahead: timedelta  # partitions exist this far past now


APPLIED_KEYS: Final = PartitionedTable("applied_keys", "day", timedelta(days=3))
CONFLICTS: Final = PartitionedTable("conflicts", "month", timedelta(days=62))
PARTITIONED_TABLES: Final = (APPLIED_KEYS, CONFLICTS)


async def ensure_partitions(conn: asyncpg.Connection, spec: PartitionedTable, now: datetime) -> int:
    """Create the partitions from `now`'s through `now + ahead`; returns how many were
    created. Rows of their ranges that had landed in the default partition move in."""
    return int(
        await conn.fetchval(_Q["ensure_partitions"], spec.table, spec.period, now, now + spec.ahead)
    )


async def drop_expired(
    conn: asyncpg.Connection, spec: PartitionedTable, before: datetime
) -> tuple[int, int]:
    """Drop the partitions wholly before `before` (and the default partition's rows before
    it); returns (partitions dropped, rows forgotten)."""
    row = await conn.fetchrow(_Q["drop_expired_partitions"], spec.table, before)
    return int(row["partitions"]), int(row["forgotten"])
