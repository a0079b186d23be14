"""The version history, acode.entity_history ([postgres] keep_history): its partitions
and how far back it reaches (docs/postgres.md#version-history).

The apply round appends to it (pg_tables.APPLY_ROUND_WITH_HISTORY_SQL); this module
keeps its daily partitions (`maintain`: at a daemon's start, then daily, and `acode db
history maintain`) and tells a restore as of a time where the history begins.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Final

import asyncpg

from acode_sync.config import PostgresSettings
from acode_sync.errors import RecordRejectedError
from acode_sync.partitions import (
    MaintenanceReport,
    PartitionSpec,
    Period,
    list_partitions,
    maintain,
)
from acode_sync.postgres import PostgresTarget

SCHEMA: Final = "acode"
TABLE: Final = "entity_history"
# The migration that creates the table (a restore as of a time needs it).
HISTORY_MIGRATION: Final = 8
MAINTENANCE_INTERVAL: Final = timedelta(days=1)
# Daily partitions made this many days ahead: a daemon that misses a few days of
# maintenance still writes into range partitions, not the DEFAULT one.
DAYS_AHEAD: Final = 7


def history_spec(settings: PostgresSettings) -> PartitionSpec:
    return PartitionSpec(
        SCHEMA,
        TABLE,
        "version",
        Period.DAY,
        timedelta(days=settings.history_retention_days),
        ahead=DAYS_AHEAD,
    )


async def maintain_history(
    target: PostgresTarget, now: datetime | None = None
) -> MaintenanceReport:
    """Drop the history's partitions past the retention, create the coming ones. Needs
    the rights of the schema's owner (DDL)."""
    await target.ensure_schema()
    async with target.administering("maintaining the version history") as conn:
        return await maintain(conn, history_spec(target.settings), now)


async def horizon(conn: asyncpg.Connection) -> datetime | None:
    """The start of the history's oldest range partition: it holds no version older (and
    none at all if it never had partitions: keep_history never on). The retention is
    read from the partitions, so any maintainer's is taken into account."""
    spec = PartitionSpec(SCHEMA, TABLE, "version", Period.DAY, timedelta(days=1))
    return next((p.start for p in await list_partitions(conn, spec) if p.start), None)


def refuse_before_horizon(as_of: str, moment: datetime, begins: datetime | None) -> None:
    """A restore as of a time the history does not reach is refused: its result could
    not be the state at that time."""
    if begins is None:
        raise RecordRejectedError(
            f"PostgreSQL keeps no version history: a restore as of {as_of} cannot be exact",
            hint="Turn [postgres] keep_history on (and run `acode db history maintain`); "
            "versions applied from then on can be restored as of a time. A restore without "
            "--as-of restores the latest versions. Nothing was written.",
        )
    if moment < begins:
        raise RecordRejectedError(
            f"{as_of} is older than the version history, which begins at "
            f"{begins.isoformat().replace('+00:00', 'Z')} (postgres.history_retention_days)",
            hint="Pick a time after the history's beginning (`acode db history maintain` "
            "prints its partitions). Nothing was written.",
        )
