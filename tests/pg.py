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
