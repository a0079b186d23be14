"""Latency of the workspace store: durable saves, gets and keyset pages.

    python -m tests.bench.bench_store [--sessions 100000]

Seeds a workspace with N sessions (one bulk transaction through the schema's own SQL),
then times, one operation at a time with time.perf_counter_ns:

- save through the async API (WorkspaceStore.save: entity row + outbox row in one
  BEGIN IMMEDIATE transaction, synchronous=FULL), for a Session update and a new
  SessionEvent;
- get by id (WorkspaceStore.get);
- a keyset page of 50 (WorkspaceStore.list_sessions) at depth 0 and at depth 50,000;

and, in the same run, the comparison baselines: a no-op thread hop, the synchronous
WorkspaceDatabase.save on the same database, and the raw sqlite3 cost of the same save
(two INSERTs in BEGIN IMMEDIATE/COMMIT on a separate database).
"""

from __future__ import annotations

import argparse
import math
import random
import sqlite3
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.to_thread

import acode_sync.store
from acode_sync.domain import (
    Session,
    SessionEvent,
    format_timestamp,
    idempotency_key,
    new_id,
    utc_now,
)
from acode_sync.sql import queries
from acode_sync.store import WorkspaceDatabase, WorkspaceStore, encode_json
from acode_sync.workspace import OpenOptions, Synchronous, database_path


def outbox_row(*values: Any) -> tuple[Any, ...]:
    """The values of the engine's insert_outbox: with the payload's canonical digest where
    its store writes one (workspace schema 7 on), else the record alone (an older engine:
    bench_growth's, an interleaved run's)."""
    with_digest = getattr(acode_sync.store, "outbox_row", None)
    return values if with_digest is None else tuple(with_digest(*values))


PAGE_SIZE: Final = 50
WALK_PAGE_SIZE: Final = 1000
SAVE_TARGET_MS: Final = 2.0
GET_TARGET_MS: Final = 0.5
PAGE_TARGET_MS: Final = 1.0
_Q = queries("sqlite")

_RAW_INSERT_EVENT = (
    "INSERT INTO session_events (event_id, session_id, event_type, payload, created_at, "
    "updated_at) VALUES (?, ?, ?, ?, ?, ?)"
)


@dataclass(frozen=True, slots=True)
class Figures:
    label: str
    samples: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    target_ms: float | None

    def line(self) -> str:
        text = (
            f"{self.label:<46} n={self.samples:<5} p50={self.p50_ms:8.3f} ms  "
            f"p99={self.p99_ms:8.3f} ms  max={self.max_ms:8.3f} ms"
        )
        if self.target_ms is not None:
            verdict = "met" if self.p99_ms <= self.target_ms else "MISSED"
            text += f"  target p99 <= {self.target_ms:g} ms: {verdict}"
        return text


def percentile(sorted_ns: Sequence[int], fraction: float) -> int:
    """Nearest-rank percentile of an ascending list."""
    rank = max(1, math.ceil(fraction * len(sorted_ns)))
    return sorted_ns[rank - 1]


def figures(label: str, samples_ns: Sequence[int], target_ms: float | None = None) -> Figures:
    ordered = sorted(samples_ns)
    return Figures(
        label=label,
        samples=len(ordered),
        p50_ms=percentile(ordered, 0.50) / 1e6,
        p99_ms=percentile(ordered, 0.99) / 1e6,
        max_ms=ordered[-1] / 1e6,
        target_ms=target_ms,
    )


async def time_async(
    operation: Callable[[int], Awaitable[object]], *, warmup: int, samples: int
) -> list[int]:
    for i in range(warmup):
        await operation(i)
    timings = []
    for i in range(warmup, warmup + samples):
        start = time.perf_counter_ns()
        await operation(i)
        timings.append(time.perf_counter_ns() - start)
    return timings


def time_sync(operation: Callable[[int], object], *, warmup: int, samples: int) -> list[int]:
    for i in range(warmup):
        operation(i)
    timings = []
    for i in range(warmup, warmup + samples):
        start = time.perf_counter_ns()
        operation(i)
        timings.append(time.perf_counter_ns() - start)
    return timings


def seed_sessions(workspace: Path, count: int) -> list[str]:
    """Create the workspace, then bulk-insert `count` sessions and their outbox records.

    Each session is updated 1 ms after the previous one, all in the past, so later saves
    move a session to the top. Rows are what WorkspaceStore.save would write.
    """
    WorkspaceDatabase(workspace).close()  # creates and migrates
    base = utc_now() - timedelta(milliseconds=count + 1000)
    session_rows: list[dict[str, Any]] = []
    outbox_rows: list[tuple[Any, ...]] = []
    for i in range(count):
        stamp = format_timestamp(base + timedelta(milliseconds=i))
        session = Session(
            title=f"bench session {i}",
            metadata={"n": i},
            created_at=stamp,
            updated_at=stamp,
        )
        row = session.row()
        outbox_rows.append(
            outbox_row(
                idempotency_key(session.entity_type, session.session_id, stamp),
                session.entity_type,
                session.session_id,
                session.session_id,
                encode_json(row),
                None,
                stamp,
            )
        )
        row["metadata"] = encode_json(row["metadata"])
        session_rows.append(row)
    conn = sqlite3.connect(database_path(workspace), isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(_Q["save_sessions"], session_rows)
        conn.executemany(_Q["insert_outbox"], outbox_rows)
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return [str(row["session_id"]) for row in session_rows]


def raw_save_baseline(workspace: Path, *, warmup: int, samples: int) -> list[int]:
    """Two INSERTs (a new event and its outbox record) in BEGIN IMMEDIATE/COMMIT,
    synchronous=FULL, on a separate workspace database; parameters built before timing."""
    database = WorkspaceDatabase(workspace)
    try:
        session_id = database.save(Session(title="baseline")).session_id
    finally:
        database.close()
    conn = sqlite3.connect(database_path(workspace), isolation_level=None, timeout=30.0)
    try:
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = FULL")
        rows = []
        for i in range(warmup + samples):
            stamp = format_timestamp(utc_now())
            event_id = new_id("evt")
            payload = encode_json({"n": i})
            event = (event_id, session_id, "bench", payload, stamp, stamp)
            record = {
                "event_id": event_id,
                "session_id": session_id,
                "event_type": "bench",
                "payload": {"n": i},
                "created_at": stamp,
                "updated_at": stamp,
            }
            outbox = outbox_row(
                idempotency_key("SessionEvent", event_id, stamp),
                "SessionEvent",
                event_id,
                session_id,
                encode_json(record),
                None,
                stamp,
            )
            rows.append((event, outbox))

        def save(i: int) -> None:
            event, outbox = rows[i]
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(_RAW_INSERT_EVENT, event)
            conn.execute(_Q["insert_outbox"], outbox)
            conn.execute("COMMIT")

        return time_sync(save, warmup=warmup, samples=samples)
    finally:
        conn.close()


async def walk_to(store: WorkspaceStore, depth: int) -> str | None:
    """The cursor after the first `depth` sessions, found by walking the pages."""
    cursor: str | None = None
    walked = 0
    while walked < depth:
        page = await store.list_sessions(limit=min(WALK_PAGE_SIZE, depth - walked), cursor=cursor)
        walked += len(page.items)
        cursor = page.next_cursor
        if cursor is None:
            raise SystemExit(f"the workspace has fewer than {depth} sessions")
    return cursor


@dataclass(frozen=True, slots=True)
class Settings:
    sessions: int
    samples: int
    page_samples: int
    warmup: int
    depth: int
    directory: Path


def query_plan(workspace: Path, query_name: str) -> list[str]:
    """EXPLAIN QUERY PLAN of a named query, as SQLite's detail lines."""
    params = {
        "before_updated_at": "9999-12-31T23:59:59.999999Z~",
        "before_session_id": "",
        "updated_since": "",
        "limit": PAGE_SIZE,
        "state": "CREATED",
    }
    conn = sqlite3.connect(database_path(workspace))
    try:
        rows = conn.execute(f"EXPLAIN QUERY PLAN {_Q[query_name]}", params).fetchall()
    finally:
        conn.close()
    return [str(row[3]) for row in rows]


async def run(settings: Settings) -> tuple[list[Figures], list[str]]:
    main_workspace = settings.directory / "workspace"
    baseline_workspace = settings.directory / "baseline"
    main_workspace.mkdir()
    baseline_workspace.mkdir()
    rng = random.Random(20260115)

    started = time.perf_counter()
    session_ids = seed_sessions(main_workspace, settings.sessions)
    print(
        f"seeded {settings.sessions} sessions (+ outbox) in {time.perf_counter() - started:.1f} s"
    )

    n, warm, page_n = settings.samples, settings.warmup, settings.page_samples
    page_warm = max(1, warm // 4)
    options = OpenOptions(synchronous=Synchronous.FULL)
    results: list[Figures] = []
    async with await WorkspaceStore.open(main_workspace, options) as store:
        targets = [rng.choice(session_ids) for _ in range(warm + n)]

        async def get(i: int) -> None:
            found = await store.get(Session, targets[i])
            assert found is not None

        results.append(
            figures(
                "get Session by id", await time_async(get, warmup=warm, samples=n), GET_TARGET_MS
            )
        )

        async def first_page(_: int) -> None:
            page = await store.list_sessions(limit=PAGE_SIZE)
            assert len(page.items) == PAGE_SIZE

        timings = await time_async(first_page, warmup=page_warm, samples=page_n)
        results.append(figures("list_sessions page of 50, depth 0", timings, PAGE_TARGET_MS))

        deep_cursor = await walk_to(store, settings.depth)

        async def deep_page(_: int) -> None:
            page = await store.list_sessions(limit=PAGE_SIZE, cursor=deep_cursor)
            assert len(page.items) == PAGE_SIZE

        timings = await time_async(deep_page, warmup=page_warm, samples=page_n)
        label = f"list_sessions page of 50, depth {settings.depth:,}"
        results.append(figures(label, timings, PAGE_TARGET_MS))

        async def hop(_: int) -> None:
            await anyio.to_thread.run_sync(lambda: None)

        timings = await time_async(hop, warmup=warm, samples=n)
        results.append(figures("thread hop alone (anyio.to_thread, no-op)", timings))

        updates = [rng.choice(session_ids) for _ in range(warm + n)]

        async def save_update(i: int) -> None:
            await store.save(Session(session_id=updates[i], title=f"update {i}"))

        timings = await time_async(save_update, warmup=warm, samples=n)
        results.append(figures("save Session update (WorkspaceStore)", timings, SAVE_TARGET_MS))

        parents = [rng.choice(session_ids) for _ in range(warm + n)]

        async def save_event(i: int) -> None:
            event = SessionEvent(session_id=parents[i], event_type="bench", payload={"n": i})
            await store.save(event)

        timings = await time_async(save_event, warmup=warm, samples=n)
        results.append(figures("save new SessionEvent (WorkspaceStore)", timings, SAVE_TARGET_MS))

    database = WorkspaceDatabase(main_workspace, options)
    try:

        def sync_save_event(i: int) -> None:
            event = SessionEvent(session_id=parents[i], event_type="bench", payload={"n": i})
            database.save(event)

        timings = time_sync(sync_save_event, warmup=warm, samples=n)
    finally:
        database.close()
    results.append(figures("baseline: WorkspaceDatabase.save, same thread", timings))
    timings = raw_save_baseline(baseline_workspace, warmup=warm, samples=n)
    results.append(figures("baseline: raw sqlite3, 2 INSERTs + COMMIT", timings))
    plans = [
        f"{name}: {detail}"
        for name in ("list_sessions", "list_sessions_in_state")
        for detail in query_plan(main_workspace, name)
    ]
    return results, plans


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.bench_store",
        description="Time durable saves, gets and keyset pages of the workspace store.",
    )
    parser.add_argument("--sessions", type=int, default=100_000, help="sessions to seed")
    parser.add_argument("--samples", type=int, default=2000, help="timed saves and gets")
    parser.add_argument("--page-samples", type=int, default=500, help="timed page fetches")
    parser.add_argument("--warmup", type=int, default=200, help="untimed runs before each")
    parser.add_argument(
        "--depth", type=int, default=50_000, help="deep page position (capped at sessions/2)"
    )
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to create the databases (default: a temp dir)"
    )
    args = parser.parse_args(argv)
    if args.sessions < 2 * PAGE_SIZE or args.samples < 1 or args.page_samples < 1:
        parser.error(f"need --sessions >= {2 * PAGE_SIZE} and at least one sample")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    depth = min(args.depth, args.sessions // 2)
    print(
        f"acode-sync store benchmark: {args.sessions} sessions, synchronous=FULL, WAL, "
        f"SQLite {sqlite3.sqlite_version}, Python {sys.version.split()[0]}"
    )
    with tempfile.TemporaryDirectory(prefix="acode-bench-", dir=args.dir) as directory:
        print(f"databases in {directory}")
        settings = Settings(
            sessions=args.sessions,
            samples=args.samples,
            page_samples=args.page_samples,
            warmup=args.warmup,
            depth=depth,
            directory=Path(directory),
        )
        results, plans = anyio.run(run, settings, backend="asyncio")
    print()
    for result in results:
        print(result.line())
    print()
    for plan in plans:
        print(f"query plan of {plan}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
