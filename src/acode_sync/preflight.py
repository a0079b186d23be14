"""`acode-syncd check-config --connect`: connect as the daemon would (credentials, TLS),
then check the central schema's version and the role's privileges. Every problem is one
line that names what is wrong and how to fix it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

import anyio
import asyncpg

from acode_sync.config import PostgresSettings
from acode_sync.errors import SchemaMismatchError
from acode_sync.migrations import latest_version, load_migrations
from acode_sync.postgres import DIALECT, PostgresTarget, read_schema_plan
from acode_sync.roles import SYNCER_PRIVILEGES, grant_statement
from acode_sync.sql import queries

_Q = queries(DIALECT)
POOLING_TRIES: Final = 5


@dataclass
class Findings:
    passed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


async def check_postgres(settings: PostgresSettings) -> Findings:
    found = Findings()
    target = PostgresTarget(settings)
    try:
        conn = await _connect(settings)
    except Exception as error:
        found.problems.append(target.outage(error, "connecting").message)
        return found
    try:
        await _check(conn, settings, found)
        if conn.get_server_pid() != await conn.fetchval(_Q["backend_pid"]):
            await _check_pooler(conn, settings, found)
    except Exception as error:
        found.problems.append(target.outage(error, "checking").message)
    finally:
        await conn.close()
    return found


async def _connect(settings: PostgresSettings) -> asyncpg.Connection:
    with anyio.fail_after(settings.connect_timeout):
        return await asyncpg.connect(
            dsn=settings.connect_dsn(),
            password=settings.resolved_password(),
            timeout=settings.connect_timeout,
            server_settings={"application_name": "acode-syncd check-config"},
            # Behind a transaction-pooling PgBouncer a cached statement would be looked for
            # on another server connection: these checks must work wherever they run.
            statement_cache_size=0,
        )


async def _check_pooler(
    conn: asyncpg.Connection, settings: PostgresSettings, found: Findings
) -> None:
    """The login was answered by a connection pooler: in transaction pooling, which
    hands a server connection to another client between transactions, asyncpg's
    prepared statements cannot work, and the daemon needs its statement cache off."""
    other = await _connect(settings)
    try:
        shared = await _shares_server_connections(conn, other)
    finally:
        await other.close()
    cache = settings.statement_cache_size
    if not shared:
        found.passed.append(
            "behind a connection pooler that keeps each client on its own server "
            f"connection (session pooling): statement_cache_size = {cache} works there"
        )
    elif cache:
        found.problems.append(
            "behind a connection pooler in transaction pooling (PgBouncer's pool_mode = "
            "transaction): a prepared statement lives on one server connection, so with "
            f"postgres.statement_cache_size = {cache} batches would fail with SQLSTATE "
            "26000; set postgres.statement_cache_size = 0"
        )
    else:
        found.passed.append(
            "behind a connection pooler in transaction pooling, with "
            "postgres.statement_cache_size = 0, as it needs"
        )


async def _shares_server_connections(first: asyncpg.Connection, second: asyncpg.Connection) -> bool:
    """Whether the server connection one client used can serve the next client's
    transaction. A session-pooling pooler never allows it; a transaction-pooling one
    (PgBouncer reuses the connection released last) does unless other clients take it
    first, so a few tries."""
    for _ in range(POOLING_TRIES):
        if await first.fetchval(_Q["backend_pid"]) == await second.fetchval(_Q["backend_pid"]):
            return True
    return False


async def _check(conn: asyncpg.Connection, settings: PostgresSettings, found: Findings) -> None:
    facts = await conn.fetchrow(_Q["connection_facts"])
    role = facts["role"]
    found.passed.append(
        f"connected to PostgreSQL {facts['version']} at {settings.host_description()} "
        f"as role {role}, TLS {'on' if facts['tls'] else 'off'}"
    )
    available = load_migrations(DIALECT)
    needed = latest_version(available)
    try:
        exists, applied, pending = await read_schema_plan(conn, available)
    except SchemaMismatchError as error:
        found.problems.append(f"the schema acode: {error.message}: upgrade acode-sync")
        return
    if not exists:
        if settings.auto_migrate and facts["may_create_schema"]:
            found.passed.append(
                f"no schema acode yet: the first batch creates it (version {needed})"
            )
        else:
            found.problems.append(
                "the schema acode does not exist: run `acode db migrate --postgres` as its "
                "owner (or allow this role CREATE on the database, with auto_migrate on)"
            )
        return
    current = max((m.version for m in applied), default=0)
    if pending:
        found.problems.append(
            f"the schema acode is at version {current}, this program needs {needed}: run "
            "`acode db migrate --postgres` as the schema's owner"
        )
    else:
        found.passed.append(f"schema acode at version {current}, as this program needs")
    kinds, names, privileges = zip(*SYNCER_PRIVILEGES, strict=True)
    missing = await conn.fetch(_Q["missing_privileges"], kinds, names, privileges)
    for row in missing:
        kind, name, privilege = row["kind"], row["object"], row["privilege"]
        fix = grant_statement(kind, name, privilege, role)
        found.problems.append(f"role {role} lacks {privilege} on {kind} {name}: {fix}")
    if not missing:
        found.passed.append(f"role {role} has every privilege a syncer needs")
