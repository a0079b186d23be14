"""Time partitions of a range-partitioned PostgreSQL table: created ahead, dropped whole.

A `PartitionSpec` names a table PARTITIONED BY RANGE on a timestamptz column, the
length of one partition (a UTC day or month) and how long rows are kept. `ensure`
creates the partitions covering [now - retention, now + `ahead` periods] and the DEFAULT
partition; `drop_expired` detaches and drops every partition wholly older than the
retention (never a DELETE). Both are idempotent and run under a transaction-scoped
advisory lock per table, so any number of maintainers may run at once: the first does
the work, the others find it done.

The DEFAULT partition catches a row no range partition covers (a version older than the
oldest partition, or newer than the newest one when maintenance has not run for a
while), so a write never fails for want of a partition. When `ensure` creates a range
partition, the DEFAULT partition's rows in that range move into it in the same
transaction (PostgreSQL refuses a partition whose range the DEFAULT partition holds rows
of). `drop_expired` leaves the DEFAULT partition alone; `outside_rows` reports its size.

Partitions are named after the parent and the first day of their period:
`<table>_p20260131` (a day), `<table>_p202601` (a month), `<table>_default`. Only
partitions so named are ever dropped. The DDL is built from the spec (identifiers
checked at construction, never input) and from computed bounds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Final

import asyncpg

from acode_sync.sql import queries

# "acpt": partition maintenance's advisory locks, apart from the sync engine's.
PARTITION_LOCK_NAMESPACE: Final = 0x61637074
_IDENTIFIER: Final = re.compile(r"^[a-z_][a-z0-9_]{0,40}$")
_Q = queries("postgres")


class Period(Enum):
    DAY = "day"
    MONTH = "month"

    def start(self, moment: datetime) -> datetime:
        """The start (UTC) of the period holding `moment`."""
        utc = moment.astimezone(UTC)
        day = datetime(utc.year, utc.month, utc.day, tzinfo=UTC)
        return day if self is Period.DAY else day.replace(day=1)

    def following(self, start: datetime) -> datetime:
        """The start of the period after the one starting at `start`."""
        if self is Period.DAY:
            return start + timedelta(days=1)
        year, month = divmod(start.month, 12)
        return start.replace(year=start.year + year, month=month + 1)

    def suffix(self, start: datetime) -> str:
        return start.strftime("%Y%m%d" if self is Period.DAY else "%Y%m")

    def parse_suffix(self, suffix: str) -> datetime | None:
        try:
            parsed = datetime.strptime(suffix, "%Y%m%d" if self is Period.DAY else "%Y%m")
        except ValueError:
            return None
        start = parsed.replace(tzinfo=UTC)
        return start if self.suffix(start) == suffix else None


@dataclass(frozen=True)
class PartitionSpec:
    """A table PARTITIONED BY RANGE (`column`), a timestamptz column."""

    schema: str
    table: str
    column: str
    period: Period
    retention: timedelta
    ahead: int = 3  # periods created ahead of the current one

    def __post_init__(self) -> None:
        for name in (self.schema, self.table, self.column):
            if not _IDENTIFIER.match(name):
                raise ValueError(f"not a plain lower-case identifier: {name!r}")
        if self.retention <= timedelta(0) or self.ahead < 0:
            raise ValueError("the retention must be positive and `ahead` not negative")

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.table}"

    @property
    def default_name(self) -> str:
        return f"{self.table}_default"

    def partition_name(self, start: datetime) -> str:
        return f"{self.table}_p{self.period.suffix(start)}"

    def cutoff(self, now: datetime) -> datetime:
        """Rows older than this are past the retention."""
        return now - self.retention

    def wanted(self, now: datetime) -> list[datetime]:
        """The starts of the periods from the one holding the cutoff to `ahead` after the
        current one."""
        start = self.period.start(self.cutoff(now))
        last = self.period.start(now)
        for _ in range(self.ahead):
            last = self.period.following(last)
        starts = []
        while start <= last:
            starts.append(start)
            start = self.period.following(start)
        return starts


@dataclass(frozen=True, slots=True)
class Partition:
    name: str
    start: datetime | None  # None: the DEFAULT partition, or one not named by this module
    end: datetime | None


@dataclass
class MaintenanceReport:
    table: str
    created: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    partitions: list[Partition] = field(default_factory=list)
    outside_rows: int = 0  # rows the DEFAULT partition holds
    horizon: datetime | None = None  # the start of the oldest range partition

    def lines(self) -> list[str]:
        ranges = [p for p in self.partitions if p.start is not None]
        span = f"{ranges[0].name} .. {ranges[-1].name}" if ranges else "none"
        return [
            f"{self.table}: {len(ranges)} range partitions ({span}), "
            f"created {len(self.created)}, dropped {len(self.dropped)}, "
            f"{self.outside_rows} rows in the default partition",
            *(f"  created {name}" for name in self.created),
            *(f"  dropped {name}" for name in self.dropped),
        ]


def _filled(sql: str, **markers: str) -> str:
    for marker, value in markers.items():
        sql = sql.replace(f"<{marker}>", value)
    return sql


def _literal(moment: datetime) -> str:
    return "'" + moment.astimezone(UTC).isoformat() + "'"


async def _now(conn: asyncpg.Connection, now: datetime | None) -> datetime:
    """The server's clock unless given: one time for every maintainer of the table."""
    if now is not None:
        return now.astimezone(UTC)
    moment: datetime = await conn.fetchval("SELECT now()")
    return moment.astimezone(UTC)


async def _lock(conn: asyncpg.Connection, spec: PartitionSpec) -> None:
    await conn.execute(_Q["partition_lock"], PARTITION_LOCK_NAMESPACE, spec.qualified)


async def list_partitions(conn: asyncpg.Connection, spec: PartitionSpec) -> list[Partition]:
    """The table's partitions, range partitions by start, then the others."""
    rows = await conn.fetch(_Q["partition_list"], spec.schema, spec.table)
    prefix = f"{spec.table}_p"
    ranged, others = [], []
    for row in rows:
        name: str = row["name"]
        start = None
        if not row["is_default"] and name.startswith(prefix):
            start = spec.period.parse_suffix(name[len(prefix) :])
        if start is None:
            others.append(Partition(name, None, None))
        else:
            ranged.append(Partition(name, start, spec.period.following(start)))
    ranged.sort(key=lambda p: p.start or datetime.min.replace(tzinfo=UTC))
    return ranged + others


async def ensure(
    conn: asyncpg.Connection, spec: PartitionSpec, now: datetime | None = None
) -> list[str]:
    """Create the DEFAULT partition and the range partitions the retention and `ahead`
    ask for that are missing; return the names created."""
    created: list[str] = []
    async with conn.transaction():
        await _lock(conn, spec)
        moment = await _now(conn, now)
        present = {p.name for p in await list_partitions(conn, spec)}
        q = {"schema": spec.schema, "table": spec.table, "column": spec.column}
        if spec.default_name not in present:
            await conn.execute(_filled(_Q["partition_create_default"], **q))
            created.append(spec.default_name)
        for start in spec.wanted(moment):
            name = spec.partition_name(start)
            if name in present:
                continue
            end = spec.period.following(start)
            await conn.execute(
                _filled(
                    _Q["partition_create"],
                    **q,
                    partition=name,
                    default=spec.default_name,
                    start=_literal(start),
                    end=_literal(end),
                )
            )
            created.append(name)
    return created


async def drop_expired(
    conn: asyncpg.Connection, spec: PartitionSpec, now: datetime | None = None
) -> list[str]:
    """Detach and drop every range partition whose rows are all older than the cutoff;
    return the names dropped."""
    dropped: list[str] = []
    async with conn.transaction():
        await _lock(conn, spec)
        cutoff = spec.cutoff(await _now(conn, now))
        for partition in await list_partitions(conn, spec):
            if partition.end is not None and partition.end <= cutoff:
                await conn.execute(
                    _filled(
                        _Q["partition_drop"],
                        schema=spec.schema,
                        table=spec.table,
                        partition=partition.name,
                    )
                )
                dropped.append(partition.name)
    return dropped


async def maintain(
    conn: asyncpg.Connection, spec: PartitionSpec, now: datetime | None = None
) -> MaintenanceReport:
    """`drop_expired`, then `ensure`, then what the table holds."""
    report = MaintenanceReport(spec.qualified)
    report.dropped = await drop_expired(conn, spec, now)
    report.created = await ensure(conn, spec, now)
    report.partitions = await list_partitions(conn, spec)
    report.horizon = next((p.start for p in report.partitions if p.start is not None), None)
    if any(p.name == spec.default_name for p in report.partitions):
        report.outside_rows = await conn.fetchval(
            _filled(_Q["partition_count_default"], schema=spec.schema, default=spec.default_name)
        )
    return report
