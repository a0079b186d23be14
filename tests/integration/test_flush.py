"""flush() in-process: the Python API's durability handshake against the real
PostgreSQL and real workspace files (the CLI and the daemon: tests/e2e/test_recovery.py)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from acode_sync.config import PostgresSettings, SyncSettings
from acode_sync.domain import Session, format_timestamp, new_id, utc_now
from acode_sync.errors import BusyError, PostgresUnavailableError, RecordRejectedError
from acode_sync.flush import flush
from acode_sync.postgres import PostgresTarget
from acode_sync.store import WorkspaceDatabase
from acode_sync.sync import SyncLock
from acode_sync.workspace import database_path
from tests.daemon_harness import free_port
from tests.records import enqueue_raw, session_payload

pytestmark = [pytest.mark.postgres, pytest.mark.anyio]


def saved(workspace: Path, count: int) -> None:
    db = WorkspaceDatabase(workspace)
    for n in range(count):
        db.save(Session(title=str(n)))
    db.close()


def pending(workspace: Path) -> int:
    conn = sqlite3.connect(database_path(workspace))
    try:
        return int(
            conn.execute("SELECT count(*) FROM outbox WHERE state = 'pending'").fetchone()[0]
        )
    finally:
        conn.close()


async def test_flush_ships_then_has_nothing_to_do(workspace: Path, pg_url: str) -> None:
    saved(workspace, 5)
    target = PostgresTarget(PostgresSettings(dsn=pg_url))
    try:
        result = await flush(workspace, target, SyncSettings(batch_max_records=2), max_wait=30)
        assert (result.through, result.shipped_here) == (5, True)
        assert pending(workspace) == 0
        again = await flush(workspace, target, max_wait=30)
        assert (again.through, again.shipped_here) == (5, False)
        assert "shipped by the running syncer" in again.line()
    finally:
        await target.close()


async def test_flush_times_out_behind_another_syncer(workspace: Path, pg_url: str) -> None:
    saved(workspace, 3)
    lock = SyncLock(workspace)
    assert lock.try_acquire()
    target = PostgresTarget(PostgresSettings(dsn=pg_url))
    try:
        with pytest.raises(
            BusyError,
            match=r"3 record\(s\) still pending; another syncer \(the daemon\?\) holds the "
            r"workspace's sync lock and is still shipping them",
        ):
            await flush(workspace, target, max_wait=0.5, poll=0.1)
    finally:
        lock.release()
        await target.close()
    assert pending(workspace) == 3


async def test_flush_behind_a_syncer_waiting_for_postgres_names_the_outage(
    workspace: Path,
) -> None:
    """The daemon inside a turn that waits for PostgreSQL (connecting through a failover)
    holds the lock: the flush says it waits for PostgreSQL, not that it ships."""
    saved(workspace, 3)
    lock = SyncLock(workspace)
    assert lock.try_acquire()
    dsn = f"postgresql://postgres@127.0.0.1:{free_port()}/acode"
    target = PostgresTarget(PostgresSettings(dsn=dsn, connect_timeout=1.0))
    try:
        with pytest.raises(PostgresUnavailableError) as raised:
            await flush(workspace, target, max_wait=0.5, poll=0.1)
    finally:
        lock.release()
        await target.close()
    assert raised.value.message.startswith(
        "flush timed out after 0.5 s: 3 record(s) still pending; another syncer (the daemon?) "
        "holds the workspace's sync lock and is waiting for PostgreSQL at 127.0.0.1:"
    )
    assert pending(workspace) == 3


async def test_flush_behind_records_in_their_retry_backoff_says_so(
    workspace: Path, pg_url: str
) -> None:
    saved(workspace, 1)
    stamp = format_timestamp(utc_now())
    session_id = new_id("sess")
    conn = sqlite3.connect(database_path(workspace))
    payload = json.dumps(session_payload(session_id, stamp, title="a\x00b"))  # PostgreSQL: no
    enqueue_raw(
        conn, f"Session:{session_id}:{stamp}", "Session", session_id, session_id, payload, stamp
    )
    conn.commit()
    conn.close()
    target = PostgresTarget(PostgresSettings(dsn=pg_url))
    try:
        with pytest.raises(RecordRejectedError) as raised:
            await flush(workspace, target, SyncSettings(retry_base_seconds=600), max_wait=1)
    finally:
        await target.close()
    assert raised.value.message.startswith(
        "flush timed out after 1 s: 1 record(s) still pending; they wait behind records "
        "PostgreSQL refused, retried with a backoff (the next attempt at 20"
    )
    assert "acode db outbox list --failed" in raised.value.hint
    assert pending(workspace) == 1


async def test_flush_times_out_while_postgres_is_down(workspace: Path) -> None:
    saved(workspace, 2)
    dsn = f"postgresql://postgres@127.0.0.1:{free_port()}/acode"
    target = PostgresTarget(PostgresSettings(dsn=dsn, connect_timeout=1.0))
    try:
        with pytest.raises(PostgresUnavailableError, match=r"2 record\(s\) still pending"):
            await flush(workspace, target, max_wait=1.5, poll=0.1)
    finally:
        await target.close()
    assert pending(workspace) == 2


async def test_flush_fails_on_a_dead_letter(workspace: Path, pg_url: str) -> None:
    saved(workspace, 2)
    conn = sqlite3.connect(database_path(workspace))
    conn.execute("UPDATE outbox SET state = 'dead' WHERE outbox_id = 1")
    conn.commit()
    conn.close()
    target = PostgresTarget(PostgresSettings(dsn=pg_url))
    try:
        with pytest.raises(RecordRejectedError, match=r"1 record\(s\) .* dead letters"):
            await flush(workspace, target, max_wait=5)
    finally:
        await target.close()
