"""The payload's canonical digest, computed by the store at the save (outbox_records'
payload_digests: the payload's SHA-256, then its canonical digest), shipped by the
syncer while the payload is the one it was computed for, else computed again."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from acode_sync.config import PostgresSettings, SyncSettings
from acode_sync.domain import Session, SessionEvent
from acode_sync.jsonb import payload_digest_as_jsonb
from acode_sync.postgres import PostgresTarget
from acode_sync.store import STORE_DIGEST_MAX_BYTES, WorkspaceDatabase, WorkspaceStore
from acode_sync.sync import WorkspaceSyncer
from acode_sync.workspace import database_path
from tests.records import enqueue_raw, run_sql, session_payload

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

T0 = "2026-01-01T00:00:00.000000Z"
MARKED = bytes([9]) * 32  # a digest no payload has: a row holds it only if it was shipped


@pytest.fixture
async def target(pg_url: str) -> AsyncIterator[PostgresTarget]:
    target = PostgresTarget(PostgresSettings(dsn=pg_url, connect_timeout=5, statement_timeout=10))
    yield target
    await target.close()


async def drain(workspace: Path, target: PostgresTarget) -> None:
    summary = await WorkspaceSyncer(
        workspace=workspace, target=target, settings=SyncSettings()
    ).drain()
    assert (summary.dead, summary.retried) == (0, 0), summary.line()


async def central_digests(pg_url: str, table: str, id_column: str) -> dict[str, bytes]:
    conn = await asyncpg.connect(pg_url)
    try:
        rows = await conn.fetch(f"SELECT {id_column}, canonical_digest FROM acode.{table}")
    finally:
        await conn.close()
    return {row[0]: row[1] for row in rows}


async def postgresqls_digest(pg_url: str, payload: str) -> bytes:
    conn = await asyncpg.connect(pg_url)
    try:
        digest: bytes = await conn.fetchval(
            "SELECT sha256(convert_to($1::jsonb::text, 'UTF8'))", payload
        )
    finally:
        await conn.close()
    return digest


def stored_digests(workspace: Path) -> dict[str, tuple[str, bytes | None]]:
    rows = run_sql(workspace, "SELECT entity_id, payload, payload_digests FROM outbox_records")
    return {entity_id: (payload, digests) for entity_id, payload, digests in rows}


def mark(workspace: Path, entity_id: str) -> None:
    """The record's stored canonical digest replaced by MARKED, its payload's kept."""
    digests = stored_digests(workspace)[entity_id][1]
    assert digests is not None
    run_sql(
        workspace,
        "UPDATE outbox_records SET payload_digests = ? WHERE entity_id = ?",
        (digests[:32] + MARKED, entity_id),
    )


async def test_the_store_writes_the_payloads_digests_and_none_where_it_is_not_certain(
    workspace: Path, store: WorkspaceStore, pg_url: str
) -> None:
    plain = await store.save(Session(title="é\n\u2028", metadata={"bb": [1, -2], "a": {"z": None}}))
    fraction = await store.save(Session(title="t", metadata={"duration": 0.5}))
    event = await store.save(SessionEvent(session_id=plain.session_id, event_type="m", payload={}))
    large = await store.save(Session(title="x" * STORE_DIGEST_MAX_BYTES))
    stored = stored_digests(workspace)
    for entity_id in (plain.session_id, event.event_id):
        payload, digests = stored[entity_id]
        assert digests == (
            hashlib.sha256(payload.encode()).digest() + await postgresqls_digest(pg_url, payload)
        )
    assert stored[fraction.session_id][1] is None  # PostgreSQL respells 0.5: left to it
    assert stored[large.session_id][1] is None  # left to the syncer, off the write lock


async def test_the_syncer_ships_the_stored_digest_and_computes_a_missing_one(
    workspace: Path, target: PostgresTarget, pg_url: str
) -> None:
    db = WorkspaceDatabase(workspace)
    try:
        marked = db.save(Session(title="marked"))
        fraction = db.save(Session(title="fraction", metadata={"ratio": 0.25}))
        enqueue_raw(  # a plain-SQL writer: no digest
            db.conn,
            f"Session:sess_plain:{T0}",
            "Session",
            "sess_plain",
            "sess_plain",
            json.dumps(session_payload("sess_plain", T0, title="plain")),
            T0,
        )
        db.conn.commit()
    finally:
        db.close()
    mark(workspace, marked.session_id)
    stored = stored_digests(workspace)
    assert stored["sess_plain"][1] is None
    await drain(workspace, target)
    central = await central_digests(pg_url, "sessions", "session_id")
    assert central[marked.session_id] == MARKED
    for entity_id in ("sess_plain", fraction.session_id):
        assert central[entity_id] == await postgresqls_digest(pg_url, stored[entity_id][0])
    assert central["sess_plain"] == payload_digest_as_jsonb(stored["sess_plain"][0].encode())


def _blob_write(workspace: Path, entity_id: str, payload: str) -> None:
    """The payload overwritten in place by incremental BLOB I/O (no UPDATE, no trigger)."""
    conn = sqlite3.connect(database_path(workspace))
    try:
        (rowid,) = conn.execute(
            "SELECT outbox_id FROM outbox_records WHERE entity_id = ?", (entity_id,)
        ).fetchone()
        with conn.blobopen("outbox_records", "payload", rowid) as blob:
            blob.write(payload.encode())
        conn.commit()
    finally:
        conn.close()


@pytest.mark.parametrize("edit", ["view", "table", "blob"])
async def test_a_payload_changed_after_the_save_has_its_digest_computed_again(
    workspace: Path, store: WorkspaceStore, target: PostgresTarget, pg_url: str, edit: str
) -> None:
    saved = await store.save(Session(title="before"))
    mark(workspace, saved.session_id)
    payload, _ = stored_digests(workspace)[saved.session_id]
    edited = payload.replace('"before"', '"BEFORE"')
    if edit == "blob":
        _blob_write(workspace, saved.session_id, edited)
    else:
        table = "outbox" if edit == "view" else "outbox_records"
        sql = f"UPDATE {table} SET payload = ? WHERE entity_id = ?"
        run_sql(workspace, sql, (edited, saved.session_id))
    assert stored_digests(workspace)[saved.session_id][0] == edited
    await drain(workspace, target)
    central = await central_digests(pg_url, "sessions", "session_id")
    assert central[saved.session_id] == await postgresqls_digest(pg_url, edited)


@pytest.mark.parametrize("stored", [MARKED, MARKED * 3, b"\x09"])
async def test_stored_digests_of_another_length_are_ignored(
    workspace: Path, store: WorkspaceStore, target: PostgresTarget, pg_url: str, stored: bytes
) -> None:
    saved = await store.save(Session(title="t"))
    run_sql(workspace, "UPDATE outbox_records SET payload_digests = ?", (stored,))
    await drain(workspace, target)
    central = await central_digests(pg_url, "sessions", "session_id")
    payload = stored_digests(workspace)[saved.session_id][0]
    assert central[saved.session_id] == await postgresqls_digest(pg_url, payload)
