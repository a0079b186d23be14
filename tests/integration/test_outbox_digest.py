"""The payload's canonical digest, computed by the store at the save (outbox_records'
jsonb_digest), shipped by the syncer, and dropped when the payload changes without it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from acode_sync.config import PostgresSettings, SyncSettings
from acode_sync.domain import Session, SessionEvent
from acode_sync.jsonb import payload_digest_as_jsonb
from acode_sync.postgres import PostgresTarget
from acode_sync.store import WorkspaceDatabase
from acode_sync.sync import WorkspaceSyncer
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
    rows = run_sql(workspace, "SELECT entity_id, payload, jsonb_digest FROM outbox_records")
    return {entity_id: (payload, digest) for entity_id, payload, digest in rows}


async def test_the_store_writes_postgresqls_digest_and_none_where_it_is_not_certain(
    workspace: Path, pg_url: str
) -> None:
    db = WorkspaceDatabase(workspace)
    try:
        plain = db.save(Session(title="é\n\u2028", metadata={"bb": [1, -2], "a": {"z": None}}))
        fraction = db.save(Session(title="t", metadata={"duration": 0.5}))
        event = db.save(SessionEvent(session_id=plain.session_id, event_type="m", payload={}))
    finally:
        db.close()
    stored = stored_digests(workspace)
    for entity_id in (plain.session_id, event.event_id):
        payload, digest = stored[entity_id]
        assert digest == await postgresqls_digest(pg_url, payload)
    assert stored[fraction.session_id][1] is None  # PostgreSQL respells 0.5: left to it


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
    run_sql(
        workspace,
        "UPDATE outbox_records SET jsonb_digest = ? WHERE entity_id = ?",
        (MARKED, marked.session_id),
    )
    stored = stored_digests(workspace)
    assert stored["sess_plain"][1] is None
    await drain(workspace, target)
    central = await central_digests(pg_url, "sessions", "session_id")
    assert central[marked.session_id] == MARKED
    for entity_id in ("sess_plain", fraction.session_id):
        assert central[entity_id] == await postgresqls_digest(pg_url, stored[entity_id][0])
    assert central["sess_plain"] == payload_digest_as_jsonb(stored["sess_plain"][0].encode())


@pytest.mark.parametrize(
    "edit",
    [
        "UPDATE outbox SET payload = :payload WHERE entity_id = :id",
        "UPDATE outbox_records SET payload = :payload WHERE entity_id = :id",
    ],
)
async def test_a_payload_edited_without_its_digest_loses_it(
    workspace: Path, target: PostgresTarget, pg_url: str, edit: str
) -> None:
    db = WorkspaceDatabase(workspace)
    try:
        saved = db.save(Session(title="before"))
    finally:
        db.close()
    (payload, before), *_ = stored_digests(workspace).values()
    assert before is not None
    edited = json.dumps(json.loads(payload) | {"title": "after"})
    run_sql(workspace, edit, {"payload": edited, "id": saved.session_id})
    assert stored_digests(workspace)[saved.session_id] == (edited, None)
    await drain(workspace, target)
    central = await central_digests(pg_url, "sessions", "session_id")
    assert central[saved.session_id] == await postgresqls_digest(pg_url, edited)


async def test_a_digest_set_with_its_payload_is_kept_and_one_of_another_length_ignored(
    workspace: Path, target: PostgresTarget, pg_url: str
) -> None:
    db = WorkspaceDatabase(workspace)
    try:
        kept = db.save(Session(title="kept"))
        short = db.save(Session(title="short"))
    finally:
        db.close()
    run_sql(
        workspace,
        "UPDATE outbox_records SET payload = json_set(payload, '$.title', 'u'), jsonb_digest = ?"
        " WHERE entity_id = ?",
        (MARKED, kept.session_id),
    )
    run_sql(
        workspace,
        "UPDATE outbox_records SET jsonb_digest = x'0909' WHERE entity_id = ?",
        (short.session_id,),
    )
    stored = stored_digests(workspace)
    assert stored[kept.session_id][1] == MARKED
    await drain(workspace, target)
    central = await central_digests(pg_url, "sessions", "session_id")
    assert central[kept.session_id] == MARKED
    assert central[short.session_id] == await postgresqls_digest(
        pg_url, stored[short.session_id][0]
    )
