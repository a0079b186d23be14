"""`acode-syncd check-config --connect`: connect as the daemon would (credentials, TLS),
then check the central schema's version and the role's privileges. Every problem is one
line that names what is wrong and how to fix it."""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio
import asyncpg

from acode_sync.config import PostgresSettings
from acode_sync.errors import SchemaMismatchError
from acode_sync.migrations import AppliedMigration, latest_version, load_migrations, plan_migrations
from acode_sync.postgres import DIALECT, PostgresTarget
from acode_sync.roles import SYNCER_PRIVILEGES, grant_statement
from acode_sync.sql import queries

_Q = queries(DIALECT)


@dataclass
class Findings:
    passed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


async def check_postgres(settings: PostgresSettings) -> Findings:
    found = Findings()
    target = PostgresTarget(settings)
    try:
        with anyio.fail_after(settings.connect_timeout):
            conn = await asyncpg.connect(
                dsn=settings.connect_dsn(),
                password=settings.resolved_password(),
                timeout=settings.connect_timeout,
                server_settings={"application_name": "acode-syncd check-config"},
            )
    except Exception as error:
        found.problems.append(target.outage(error, "connecting").message)
        return found
    try:
        await _check(conn, settings, found)
    except Exception as error:
        found.problems.append(target.outage(error, "checking").message)
    finally:
        await conn.close()
    return found


async def _check(conn: asyncpg.Connection, settings: PostgresSettings, found: Findings) -> None:
    facts = await conn.fetchrow(_Q["connection_facts"])
    role = facts["role"]
    found.passed.append(
        f"connected to PostgreSQL {facts['version']} at {settings.host_description()} "
        f"as role {role}, TLS {'on' if facts['tls'] else 'off'}"
    )
    available = load_migrations(DIALECT)
    needed = latest_version(available)
    if not await conn.fetchval(_Q["schema_exists"]):
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
    rows = await conn.fetch(_Q["applied_migrations"])
    applied = [AppliedMigration(r["version"], r["checksum"]) for r in rows]
    current = max((m.version for m in applied), default=0)
    try:
        pending = plan_migrations(applied, available)
    except SchemaMismatchError as error:
        found.problems.append(f"the schema acode: {error.message}: upgrade acode-sync")
        return
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
