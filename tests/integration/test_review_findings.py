"""Holes found in the hardening claims (docs/reliability.md, docs/sync.md, docs/schema.md).

Each test shows one hole on the real SQLite files and the real PostgreSQL, and is marked
fails on the code before its fix."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import closing, contextmanager
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final

import asyncpg
import pytest

from acode_sync.config import PostgresSettings, SyncSettings
from acode_sync.domain import Session, format_timestamp, utc_now
from acode_sync.errors import (
    PostgresRefusedError,
    PostgresSchemaMismatchError,
    PostgresUnavailableError,
)
from acode_sync.postgres import LOCK_NAMESPACE, PostgresTarget, lock_key
from acode_sync.store import WorkspaceDatabase
from acode_sync.sync import WorkspaceSyncer
from acode_sync.workspace import OpenOptions, database_path
from tests.pg import (
    ADMIN_URL,
    APPLIED_VERSION_KEYS,
    create_database_async,
    database_url,
    drop_database_async,
)
from tests.records import enqueue_raw, run_sql, session_payload

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

NO_BACKOFF: Final[dict[str, Any]] = {"retry_base_seconds": 0.0, "retry_cap_seconds": 0.0}


@contextmanager
def writer(workspace: Path) -> Iterator[sqlite3.Connection]:
    """Another process's connection to the workspace, autocommit, as a person's tool has."""
    with closing(sqlite3.connect(database_path(workspace), isolation_level=None)) as conn:
        conn.execute("PRAGMA foreign_keys = ON")
        yield conn


async def applied_keys(pg_url: str) -> set[str]:
    conn = await asyncpg.connect(pg_url)
    try:
        rows = await conn.fetch(APPLIED_VERSION_KEYS)
    finally:
        await conn.close()
    return {row[0] for row in rows}


def queue_session(conn: sqlite3.Connection, session_id: str, stamp: str) -> int:
    payload = json.dumps(session_payload(session_id, stamp))
    key = f"Session:{session_id}:{stamp}"
    return enqueue_raw(conn, key, "Session", session_id, session_id, payload, stamp)


# --- 1. A record re-inserted with the id of a retried record in flight is never sent ----


async def test_a_record_re_inserted_with_the_id_of_a_retried_record_in_flight_is_shipped(
    workspace: Path, pg_url: str
) -> None:
    """docs/reliability.md: "A record inserted with an outbox_id given before (deleted and
    inserted again ...) is pending and shipped, whatever the mark or a batch in flight has
    passed". That holds for a record past the mark, not for one with a sync row (a
    retried or re-queued record): the mark's `mark_processed` finds the new record's fresh
    pending sync row by id and marks it processed."""
    WorkspaceDatabase(workspace).close()
    stamp = format_timestamp(utc_now())
    with writer(workspace) as conn:
        first = queue_session(conn, "sess_first", stamp)
    target = PostgresTarget(PostgresSettings(dsn=pg_url))
    try:
        assert (await WorkspaceSyncer(workspace=workspace, target=target).drain()).applied == 1
        # A person re-queues it (docs/schema.md: state = 'pending'): it has a sync row now.
        run_sql(workspace, "UPDATE outbox SET state = 'pending' WHERE outbox_id = ?", (first,))

        def replace_the_record(point: str) -> None:
            # PostgreSQL has committed the resend; before the mark, a writer replaces the
            # record with a new one under the same id (the backfill trigger gives it a
            # pending sync row, as documented).
            if point != "after_commit":
                return
            with writer(workspace) as conn:
                conn.execute("DELETE FROM outbox WHERE outbox_id = ?", (first,))
                payload = json.dumps(session_payload("sess_new", stamp, title="new"))
                conn.execute(
                    "INSERT INTO outbox (outbox_id, idempotency_key, entity_type, entity_id,"
                    " session_id, payload, created_at) VALUES (?, ?, 'Session', 'sess_new',"
                    " 'sess_new', ?, ?)",
                    (first, f"Session:sess_new:{stamp}", payload, stamp),
                )

        syncer = WorkspaceSyncer(workspace=workspace, target=target, fault_hook=replace_the_record)
        await syncer.drain()
        await WorkspaceSyncer(workspace=workspace, target=target).drain()
    finally:
        await target.close()
    # Expected: the new record is pending, then shipped. Actual: it is `processed` without
    # ever reaching PostgreSQL.
    state = run_sql(workspace, "SELECT state FROM outbox WHERE outbox_id = ?", (first,))
    assert f"Session:sess_new:{stamp}" in await applied_keys(pg_url), state


# --- 2. A batch lock held by a stalled peer: no lock_timeout, and records are charged ----


async def test_a_session_lock_held_by_a_stalled_peer_charges_no_record(
    workspace: Path, pg_url: str
) -> None:
    """docs/sync.md: each batch sets lock_timeout so that a lock wait fails with 55P03, a
    refusal, "before the statement timeout could make it look like a slow record". The
    batch's first statement is `SELECT (SELECT set_config(... lock_timeout ...)), ...,
    count(pg_advisory_xact_lock($1, k)) FROM unnest($2)`: the aggregate takes every
    advisory lock before the scalar subqueries run, so the wait for a session lock has the
    role's lock_timeout (none). A peer syncer whose transaction stalls mid-batch (its
    laptop suspended, its process stopped) holds that session's lock: this syncer's batch
    runs into the client-side timeout, a suspect failure; after three strikes the batch is
    bisected, the other session's record is applied and the locked session's record,
    "failing alone while the server took other work", is charged."""
    db = WorkspaceDatabase(workspace)
    try:
        locked = db.save(Session(title="locked by a stalled peer")).session_id
        db.save(Session(title="free"))
    finally:
        db.close()
    owner = PostgresTarget(PostgresSettings(dsn=pg_url))
    await owner.ensure_schema()
    await owner.close()
    peer = await asyncpg.connect(pg_url)  # a peer's batch, stalled while it holds the lock
    await peer.execute("BEGIN")
    await peer.execute("SELECT pg_advisory_xact_lock($1, $2)", LOCK_NAMESPACE, lock_key(locked))
    settings = PostgresSettings(dsn=pg_url, statement_timeout=0.4, connect_timeout=0.4)
    target = PostgresTarget(settings)
    syncer = WorkspaceSyncer(
        workspace=workspace, target=target, settings=SyncSettings(max_attempts=3, **NO_BACKOFF)
    )
    errors: list[PostgresUnavailableError] = []
    try:
        for _ in range(4):  # past the three strikes that isolate a suspect batch
            try:
                await syncer.drain()
            except PostgresUnavailableError as error:
                errors.append(error)
    finally:
        await target.close()
        await peer.close()
    # Expected: a refusal (55P03, lock not available) every time, nothing charged.
    # Actual: client-side timeouts (suspect), then the locked session's record charged.
    charged = run_sql(workspace, "SELECT state, attempts FROM outbox WHERE attempts > 0")
    assert charged == []
    assert errors
    assert all(isinstance(e, PostgresRefusedError) and e.sqlstate == "55P03" for e in errors)


# --- 3. A central database that is not UTF-8: its encoding is charged to the records ----


@pytest.fixture
async def latin1_url() -> AsyncIterator[str]:
    """A database created LATIN1 (as `createdb -E LATIN1`, or a cluster initialised with a
    single-byte locale): the server's configuration, not any record's."""
    name = await create_database_async()
    await drop_database_async(name)
    admin = await asyncpg.connect(ADMIN_URL)
    try:
        await admin.execute(
            f"CREATE DATABASE \"{name}\" ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' "
            "TEMPLATE template0"
        )
    finally:
        await admin.close()
    try:
        yield database_url(name)
    finally:
        await drop_database_async(name)


async def test_a_central_database_that_is_not_utf8_charges_no_record(
    workspace: Path, latin1_url: str
) -> None:
    """docs/sync.md's rule: "a failure is charged to a record only if it follows that
    record". The round statement decodes each payload with convert_from(..., 'UTF8'),
    which converts to the database's encoding: in a LATIN1 database any character outside
    LATIN1 fails with 22P05 (untranslatable character), class 22, so the record is
    bisected out and charged, and dies after max_attempts, though any UTF-8 database takes
    it. Nothing checks the database's encoding when the schema is made or checked."""
    db = WorkspaceDatabase(workspace)
    try:
        db.save(Session(title="会话"))
        db.save(Session(title="plain"))
    finally:
        db.close()
    target = PostgresTarget(PostgresSettings(dsn=latin1_url))
    try:
        syncer = WorkspaceSyncer(
            workspace=workspace, target=target, settings=SyncSettings(**NO_BACKOFF)
        )
        # A refusal that names the database's encoding, nothing charged.
        with pytest.raises(PostgresSchemaMismatchError, match="encoding is LATIN1"):
            await syncer.drain()
    finally:
        await target.close()
    # Before: the first record was charged 22P05 on every pass (no backoff here) and was
    # dead after its 10 attempts, within the one drain.
    assert run_sql(workspace, "SELECT attempts, last_error FROM outbox WHERE attempts > 0") == []


# --- 4. A clock stepped back: the store's own next versions are dead letters -------------


async def test_saves_after_the_clock_stepped_back_are_shipped(workspace: Path, pg_url: str) -> None:
    """The machine's clock runs an hour ahead, then NTP steps it back. Saves made meanwhile
    were shipped (the syncer's clock, on the same machine, was ahead too). The next save of
    such an entity gets next_version(): its previous version plus 1 us, by design, so its
    keys never go backwards; that version is still about an hour ahead of the corrected
    clock, so prepare() refuses it as "ahead of this machine's clock" and charges it on
    each try. With the default backoff (5 s ... 1280 s, 10 attempts, about 43 minutes) it
    is dead long before the clock catches up: every entity touched during the hour ahead
    loses its later changes to the dead-letter queue. The version is based on the one
    PostgreSQL holds from this very origin: it cannot win anything it should not."""
    ahead = timedelta(hours=1)

    def ahead_clock() -> datetime:
        return utc_now() + ahead

    db = WorkspaceDatabase(workspace, OpenOptions(clock=ahead_clock))
    try:
        session = db.save(Session(title="while the clock was ahead"))
    finally:
        db.close()
    target = PostgresTarget(PostgresSettings(dsn=pg_url))
    try:
        shipped = WorkspaceSyncer(workspace=workspace, target=target, clock=ahead_clock)
        assert (await shipped.drain()).applied == 1
        db = WorkspaceDatabase(workspace)  # the clock is right again
        try:
            db.save(replace(session, title="after the clock stepped back"))
        finally:
            db.close()
        summary = await WorkspaceSyncer(
            workspace=workspace, target=target, settings=SyncSettings(**NO_BACKOFF)
        ).drain()
    finally:
        await target.close()
    # Actual: retried (and, without backoff, dead within the drain), never applied.
    assert (summary.applied, summary.retried, summary.dead) == (1, 0, 0)
