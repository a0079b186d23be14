"""Run state written straight into the central tables, as many daemons would have shipped
it: fast enough for a million entities (restores and their benchmark read it back)."""

from __future__ import annotations

from typing import Any

import asyncpg

from acode_sync.config import PostgresSettings
from acode_sync.postgres import PostgresTarget

SEED_ORIGIN = "origin-seed"


async def fetch(settings: PostgresSettings, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(settings.connect_dsn())
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


# Each session gets `events` events. The payload is rebuilt here as the store writes it,
# and its canonical digest as the apply statement records it.
_SEED_SQL = """
WITH s AS (
    SELECT 'sess_' || lpad(i::text, 12, '0') AS id, i,
           to_char((timestamptz '2026-01-15 10:30:00+00' + i * interval '1 ms')
                   AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS at
    FROM generate_series($1::int, $2::int - 1) AS i
), sessions AS (
    INSERT INTO acode.sessions (session_id, state, title, metadata, created_at, updated_at,
                                origin_id, idempotency_key, canonical_digest)
    SELECT id, 'EXECUTING', 'run ' || i, jsonb_build_object('tool', 'pytest', 'n', i),
           at::timestamptz, at::timestamptz, $4, 'Session:' || id || ':' || at,
           sha256(convert_to(jsonb_build_object(
               'session_id', id, 'state', 'EXECUTING', 'title', 'run ' || i,
               'metadata', jsonb_build_object('tool', 'pytest', 'n', i),
               'created_at', at, 'updated_at', at)::text, 'UTF8'))
    FROM s
)
INSERT INTO acode.session_events (event_id, session_id, event_type, payload, created_at,
                                  updated_at, origin_id, idempotency_key, canonical_digest)
SELECT e.id, s.id, 'step', jsonb_build_object('k', k), s.at::timestamptz, s.at::timestamptz,
       $4, 'SessionEvent:' || e.id || ':' || s.at,
       sha256(convert_to(jsonb_build_object(
           'event_id', e.id, 'session_id', s.id, 'event_type', 'step',
           'payload', jsonb_build_object('k', k), 'created_at', s.at, 'updated_at', s.at
       )::text, 'UTF8'))
FROM s, generate_series(1, $3::int) AS k,
     LATERAL (SELECT 'evt_' || lpad(s.i::text, 12, '0') || '_' || k AS id) AS e
"""


async def seed_central(dsn: str, sessions: int, events: int = 9) -> int:
    """Migrate, then write `sessions` sessions with `events` events each, in slices; the
    number of entities written."""
    target = PostgresTarget(PostgresSettings(dsn=dsn, connect_timeout=5, statement_timeout=600))
    try:
        await target.ensure_schema()
    finally:
        await target.close()
    conn = await asyncpg.connect(dsn)
    try:
        step = 20_000
        for start in range(0, sessions, step):
            await conn.execute(_SEED_SQL, start, min(start + step, sessions), events, SEED_ORIGIN)
        await conn.execute("ANALYZE")
    finally:
        await conn.close()
    return sessions * (1 + events)
