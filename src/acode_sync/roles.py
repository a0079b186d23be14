"""Roles on the central PostgreSQL: what a syncer role needs (`acode db grant ROLE`, and
the list `acode-syncd check-config --connect` checks), and tenants: row-level security
that lets a role write only its own tenant's rows (`acode db tenants enable`).

The owner of the schema acode migrates and runs these commands; syncer roles only ship
records (docs/postgres.md).
"""

from __future__ import annotations

from itertools import groupby
from typing import Final

from acode_sync.errors import RecordRejectedError
from acode_sync.pg_tables import TABLES
from acode_sync.postgres import DIALECT, LOCK_NAMESPACE, MIGRATION_LOCK, PostgresTarget
from acode_sync.sql import queries

_Q = queries(DIALECT)

# What a syncer does: read the schema's version, upsert entities, record the keys of
# versions replaced or lost (and forget the DEFAULT partition's old ones), record
# conflicts, append versions to the history, call refuse_timestamp on a bad payload time
# and refuse_session_move on a moved entity, and, with tenants enabled, let the guard
# trigger ask who holds an entity.
# Creating and dropping partitions is DDL, for the schema's owner. The one list:
# `acode db grant` grants it, check-config checks it.
SYNCER_PRIVILEGES: Final = (
    ("schema", "acode", "USAGE"),
    ("table", "acode.schema_migrations", "SELECT"),
    *(
        ("table", f"acode.{spec.table}", privilege)
        for spec in TABLES.values()
        for privilege in ("SELECT", "INSERT", "UPDATE")
    ),
    *(("table", "acode.applied_keys", p) for p in ("SELECT", "INSERT", "DELETE")),
    *(("table", "acode.conflicts", p) for p in ("SELECT", "INSERT")),
    # The version history (postgres.keep_history), appended to and read by a restore.
    *(("table", "acode.entity_history", p) for p in ("SELECT", "INSERT")),
    ("function", "acode.refuse_timestamp(text, text, text)", "EXECUTE"),
    ("function", "acode.held_by_another_tenant(text, text, text, text)", "EXECUTE"),
    ("function", "acode.refuse_session_move(text, text, text)", "EXECUTE"),
)

# Every table a tenant's rows live in; the entity tables also get the guard trigger.
ENTITY_TABLES: Final = tuple(spec.table for spec in TABLES.values())
TENANT_TABLES: Final = (*ENTITY_TABLES, "applied_keys", "conflicts", "entity_history")


def grant_statement(kind: str, name: str, privileges: str, role: str) -> str:
    target = {"schema": "SCHEMA ", "function": "FUNCTION ", "database": "DATABASE "}.get(kind, "")
    return f"GRANT {privileges} ON {target}{name} TO {role};"


def grant_statements(role: str, database: str) -> list[str]:
    """The GRANT statements that give `role` (a quoted identifier) a syncer's rights on
    `database` (quoted too): one per object, in the order of SYNCER_PRIVILEGES."""
    statements = [grant_statement("database", database, "CONNECT", role)]
    for (kind, name), rows in groupby(SYNCER_PRIVILEGES, key=lambda p: (p[0], p[1])):
        privileges = ", ".join(privilege for _, _, privilege in rows)
        statements.append(grant_statement(kind, name, privileges, role))
    return statements


async def grant_syncer(target: PostgresTarget, role: str) -> list[str]:
    """Grant `role` exactly a syncer's rights (granting again changes nothing); returns
    the statements run. The schema must be at this program's version."""
    await target.ensure_schema()
    async with target.administering("granting") as conn:
        names = await conn.fetchrow(_Q["grant_names"], role)
        if names["role"] is None:
            raise RecordRejectedError(
                f"PostgreSQL has no role {role!r}",
                hint="Create the role first (CREATE ROLE ... LOGIN PASSWORD '...'), then "
                "grant it again.",
            )
        statements = grant_statements(names["role"], names["database"])
        for statement in statements:
            await conn.execute(statement)
    return statements


async def set_tenants(target: PostgresTarget, *, enabled: bool) -> None:
    """Turn row-level security by tenant on (policies, the guard trigger) or off, on
    every table that holds a tenant's rows; doing it again changes nothing."""
    await target.ensure_schema()
    async with target.administering("enabling tenants" if enabled else "disabling tenants") as conn:
        await conn.execute(_Q["migration_lock"], LOCK_NAMESPACE, MIGRATION_LOCK)
        for table in TENANT_TABLES:
            step = "enable_tenant_rows" if enabled else "disable_tenants"
            await conn.execute(_Q[step].replace("<t>", table))
        for table in ENTITY_TABLES if enabled else ():
            await conn.execute(_Q["enable_tenant_guard"].replace("<t>", table))
