"""PostgreSQL for tests: every test gets its own database, dropped afterwards.

The server's address comes from ACODE_TEST_POSTGRES_URL (default: the local server).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg
import pytest

from acode_sync.pg_tables import TABLES

ADMIN_URL = os.environ.get(
    "ACODE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def database_url(name: str, base: str = ADMIN_URL) -> str:
    return urlunsplit(urlsplit(base)._replace(path=f"/{name}"))


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN_URL)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _new_name() -> str:
    return f"acode_test_{os.getpid()}_{secrets.token_hex(4)}"


async def create_database_async() -> str:
    name = _new_name()
    await _admin(f'CREATE DATABASE "{name}"')
    return name


async def drop_database_async(name: str) -> None:
    await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def create_database() -> str:
    return anyio.run(create_database_async)


def drop_database(name: str) -> None:
    anyio.run(drop_database_async, name)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty database for this test."""
    name = create_database()
    try:
        yield database_url(name)
    finally:
        drop_database(name)


# The key of every version PostgreSQL took: the version each entity row holds, and the
# versions replaced or lost (applied_keys; a tie's key may be listed twice). A subquery,
# for `FROM (...) AS applied`.
APPLIED_VERSION_KEYS = " UNION ALL ".join(
    [
        "SELECT idempotency_key FROM acode.applied_keys",
        *(f"SELECT idempotency_key FROM acode.{spec.table}" for spec in TABLES.values()),
    ]
)
COUNT_APPLIED_VERSIONS = f"SELECT count(*) FROM ({APPLIED_VERSION_KEYS}) AS applied"
# The same versions with the time each was written (a replaced one: when it was replaced).
APPLIED_VERSIONS = " UNION ALL ".join(
    [
        "SELECT idempotency_key, applied_at FROM acode.applied_keys",
        *(
            f"SELECT idempotency_key, synced_at AS applied_at FROM acode.{spec.table}"
            for spec in TABLES.values()
        ),
    ]
)

# Test-only: a row for every entity write PostgreSQL commits. It has no unique key, so it
# shows a double apply that the entity rows and applied_keys, unique, cannot.
AUDIT_TABLE = "acode.audit"
_AUDIT_SQL = f"""
CREATE TABLE IF NOT EXISTS {AUDIT_TABLE} (
    entity_table text NOT NULL,
    entity_id text NOT NULL,
    idempotency_key text NOT NULL,
    origin_id text NOT NULL,
    updated_at timestamptz NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE OR REPLACE FUNCTION acode.audit_write() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO {AUDIT_TABLE} (entity_table, entity_id, idempotency_key, origin_id, updated_at)
    VALUES (TG_TABLE_NAME, to_jsonb(NEW) ->> TG_ARGV[0], NEW.idempotency_key, NEW.origin_id,
            NEW.updated_at);
    RETURN NULL;
END
$$;
"""


async def install_audit(dsn: str) -> None:
    """The audit trigger on every entity table (the acode schema must exist)."""
    triggers = "".join(
        f"CREATE TRIGGER audit_write AFTER INSERT OR UPDATE ON acode.{spec.table} "
        f"FOR EACH ROW EXECUTE FUNCTION acode.audit_write('{spec.id_column}');\n"
        for spec in TABLES.values()
    )
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(_AUDIT_SQL + triggers)
    finally:
        await conn.close()
