"""Roles on the central PostgreSQL (docs/postgres.md): `acode db grant` gives a syncer
role exactly the rights check-config checks; a syncer role never runs DDL (an older
schema is a refusal that waits, never a record's failure); with tenants enabled, a
hostile writer's records for another tenant's session are dead letters and change
nothing of it. Real roles, real workspaces, the real PostgreSQL."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from acode_sync.cli import main
from acode_sync.config import PostgresSettings, SyncSettings
from acode_sync.domain import Session, SessionEvent
from acode_sync.errors import PostgresRefusedError, PostgresSchemaMismatchError
from acode_sync.migrations import load_migrations
from acode_sync.postgres import DIALECT, PostgresTarget
from acode_sync.preflight import check_postgres
from acode_sync.roles import SYNCER_PRIVILEGES, grant_statements, grant_syncer, set_tenants
from acode_sync.store import WorkspaceDatabase
from acode_sync.sync import WorkspaceSyncer
from tests.integration.test_guarantees import admin, charged
from tests.records import run_sql

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

FAST_DEATH: dict[str, Any] = {
    "max_attempts": 2,
    "retry_base_seconds": 0.0,
    "retry_cap_seconds": 0.0,
}
NewRole = Callable[[], Awaitable[tuple[str, str]]]


@pytest.fixture
async def owner(pg_url: str) -> AsyncIterator[PostgresTarget]:
    target = PostgresTarget(PostgresSettings(dsn=pg_url))
    yield target
    await target.close()


@pytest.fixture
async def new_role(pg_url: str) -> AsyncIterator[NewRole]:
    """Makes login roles with no rights at all: (role, its DSN); dropped afterwards."""
    made: list[str] = []

    async def make() -> tuple[str, str]:
        role = f"acode_syncer_{secrets.token_hex(4)}"
        await admin(pg_url, f"CREATE ROLE {role} LOGIN")
        made.append(role)
        return role, pg_url.replace("postgres@", f"{role}@", 1)

    yield make
    for role in made:
        await admin(pg_url, f"DROP OWNED BY {role}; DROP ROLE {role}")


def save(workspace: Path, *entities: Any) -> None:
    workspace.mkdir(exist_ok=True)
    db = WorkspaceDatabase(workspace)
    try:
        for entity in entities:
            db.save(entity)
    finally:
        db.close()


async def drain(workspace: Path, dsn: str, **sync: Any) -> Any:
    target = PostgresTarget(PostgresSettings(dsn=dsn, auto_migrate=True))
    try:
        syncer = WorkspaceSyncer(workspace=workspace, target=target, settings=SyncSettings(**sync))
        return await syncer.drain()
    finally:
        await target.close()


async def table_grants(pg_url: str, role: str) -> set[tuple[str, str]]:
    rows = await admin(
        pg_url,
        "SELECT table_name, privilege_type FROM information_schema.role_table_grants "
        "WHERE grantee = $1",
        role,
    )
    return {(r[0], r[1]) for r in rows}


async def test_grant_gives_exactly_what_check_config_checks_and_granting_again_changes_nothing(
    pg_url: str, owner: PostgresTarget, new_role: NewRole, tmp_path: Path
) -> None:
    role, dsn = await new_role()
    database = pg_url.rsplit("/", 1)[1]
    assert await grant_syncer(owner, role) == grant_statements(role, database)
    granted = await table_grants(pg_url, role)
    assert await grant_syncer(owner, role) == grant_statements(role, database)
    assert await table_grants(pg_url, role) == granted
    assert granted == {  # exactly the tables' part of the one list, nothing more
        (name.removeprefix("acode."), privilege)
        for kind, name, privilege in SYNCER_PRIVILEGES
        if kind == "table"
    }
    findings = await check_postgres(PostgresSettings(dsn=dsn, auto_migrate=False))
    assert findings.problems == []
    assert f"role {role} has every privilege a syncer needs" in findings.passed
    # And the role syncs, but owns nothing and may create nothing.
    save(tmp_path / "w", Session(title="granted"))
    assert (await drain(tmp_path / "w", dsn)).applied == 1
    created = await admin(
        pg_url,
        "SELECT has_schema_privilege($1, 'acode', 'CREATE'), "
        "has_database_privilege($1, current_database(), 'CREATE')",
        role,
    )
    assert tuple(created[0]) == (False, False)


async def test_granting_a_role_that_does_not_exist_names_it(owner: PostgresTarget) -> None:
    with pytest.raises(Exception, match="ACODE-DB-006: PostgreSQL has no role 'nobody_here'"):
        await grant_syncer(owner, "nobody_here")


async def older_schema_with_syncer(pg_url: str, new_role: NewRole, version: int) -> tuple[str, str]:
    """The central schema at `version` (0: none), migrated by the owner, and a role with
    a syncer's rights on what exists."""
    if version:
        target = PostgresTarget(PostgresSettings(dsn=pg_url))
        try:
            await target.ensure_schema(load_migrations(DIALECT)[:version])
        finally:
            await target.close()
    role, dsn = await new_role()
    database = pg_url.rsplit("/", 1)[1]
    for statement in grant_statements(role, database) if version else ():
        later = ("held_by_another_tenant", "refuse_session_move", "entity_history")
        if not any(name in statement for name in later):  # added by migrations 5, 6 and 8
            await admin(pg_url, statement)
    return role, dsn


@pytest.mark.parametrize("version", [0, 3])
async def test_a_syncer_role_never_migrates_an_older_schema_and_charges_no_record(
    pg_url: str, new_role: NewRole, workspace: Path, version: int
) -> None:
    role, dsn = await older_schema_with_syncer(pg_url, new_role, version)
    save(workspace, *(Session(title=f"s{n}") for n in range(3)))
    needed = len(load_migrations(DIALECT))
    for _ in range(3):  # never a record's failure: as many drains as it takes
        with pytest.raises(PostgresSchemaMismatchError) as refused:
            await drain(workspace, dsn, **FAST_DEATH)
        assert refused.value.code == "ACODE-DB-003"
        assert refused.value.message == (
            f"the PostgreSQL schema is at version {version}, this program needs {needed}, "
            f"and role {role} may not migrate it (only the owner of the schema acode migrates)"
        )
        assert "acode db migrate --postgres` as the schema's owner" in refused.value.hint
    assert charged(workspace) == []
    assert run_sql(workspace, "SELECT count(*) FROM outbox WHERE state = 'pending'") == [(3,)]
    migrated = await admin(pg_url, "SELECT to_regclass('acode.schema_migrations') IS NOT NULL")
    if migrated[0][0]:
        versions = await admin(pg_url, "SELECT max(version) FROM acode.schema_migrations")
        assert versions[0][0] == version  # no DDL ran
    # The owner migrates and grants: the same records ship, as they were.
    owner = PostgresTarget(PostgresSettings(dsn=pg_url))
    try:
        await owner.ensure_schema(explicit=True)
        await grant_syncer(owner, role)
    finally:
        await owner.close()
    summary = await drain(workspace, dsn, **FAST_DEATH)
    assert (summary.applied, summary.retried, summary.dead) == (3, 0, 0)


async def tenant_rows(pg_url: str, sql: str, *args: Any) -> list[Any]:
    return [tuple(r) for r in await admin(pg_url, sql, *args)]


async def test_a_hostile_tenant_changes_nothing_of_another_tenants_session(
    pg_url: str, owner: PostgresTarget, new_role: NewRole, tmp_path: Path
) -> None:
    (role_a, dsn_a), (role_b, dsn_b) = await new_role(), await new_role()
    await owner.ensure_schema()
    for role in (role_a, role_b):
        await grant_syncer(owner, role)
    await set_tenants(owner, enabled=True)
    await set_tenants(owner, enabled=True)  # again: nothing changes

    ours, hostile = tmp_path / "a", tmp_path / "b"
    session = Session(title="A's own")
    save(ours, session, SessionEvent(session_id=session.session_id, event_type="started"))
    assert (await drain(ours, dsn_a)).applied == 2
    before = await tenant_rows(
        pg_url,
        "SELECT title, idempotency_key, tenant FROM acode.sessions WHERE session_id = $1",
        session.session_id,
    )
    assert before[0][2] == role_a  # stamped by the server from the role

    # B writes a newer version of A's session, a new event into it, and a session of its own.
    theirs = Session(title="B's own")
    save(
        hostile,
        Session(session_id=session.session_id, title="taken over"),
        SessionEvent(session_id=session.session_id, event_type="injected"),
        theirs,
    )
    summary = await drain(hostile, dsn_b, **FAST_DEATH)
    while summary.retried and not summary.dead:
        summary = await drain(hostile, dsn_b, **FAST_DEATH)
    dead = run_sql(
        hostile,
        "SELECT entity_type, last_error FROM outbox WHERE state = 'dead' ORDER BY outbox_id",
    )
    assert [entity for entity, _ in dead] == ["Session", "SessionEvent"]
    for _, error in dead:
        assert error.startswith("23T01: ")
        assert f"belongs to another tenant; role {role_b} writes only its own tenant's rows" in (
            error
        )
        assert session.session_id in error
    assert run_sql(
        hostile, "SELECT state FROM outbox WHERE entity_id = ?", (theirs.session_id,)
    ) == [("processed",)]
    after = await tenant_rows(
        pg_url,
        "SELECT title, idempotency_key, tenant FROM acode.sessions WHERE session_id = $1",
        session.session_id,
    )
    assert after == before
    events = await tenant_rows(
        pg_url,
        "SELECT event_type, tenant FROM acode.session_events WHERE session_id = $1",
        session.session_id,
    )
    assert events == [("started", role_a)]
    held_keys = (  # every version applied keeps its key: in its row, or replaced
        "SELECT tenant, count(*) FROM (SELECT tenant FROM acode.applied_keys UNION ALL "
        "SELECT tenant FROM acode.sessions UNION ALL SELECT tenant FROM acode.session_events) "
        "AS k GROUP BY 1 ORDER BY 1"
    )
    assert await tenant_rows(pg_url, held_keys) == sorted([(role_a, 2), (role_b, 1)])

    # A's own syncing is unaffected: its next version of the session ships.
    save(ours, Session(session_id=session.session_id, title="A again"))
    summary = await drain(ours, dsn_a)
    assert (summary.applied, summary.conflicts, summary.retried) == (1, 0, 0)
    titles = await tenant_rows(
        pg_url, "SELECT title FROM acode.sessions WHERE session_id = $1", session.session_id
    )
    assert titles == [("A again",)]


async def test_with_tenants_a_role_wide_missing_privilege_is_still_the_servers_refusal(
    pg_url: str, owner: PostgresTarget, new_role: NewRole, workspace: Path
) -> None:
    role, dsn = await new_role()
    await grant_syncer(owner, role)
    await set_tenants(owner, enabled=True)
    await admin(pg_url, f"REVOKE INSERT ON acode.sessions FROM {role}")
    save(workspace, Session(title="waits"))
    for _ in range(3):
        with pytest.raises(PostgresRefusedError) as refused:
            await drain(workspace, dsn, **FAST_DEATH)
        assert refused.value.sqlstate == "42501"
    assert charged(workspace) == []


async def test_disabling_tenants_lets_every_syncer_write_every_row_again(
    pg_url: str, owner: PostgresTarget, new_role: NewRole, tmp_path: Path
) -> None:
    (role_a, dsn_a), (role_b, dsn_b) = await new_role(), await new_role()
    for role in (role_a, role_b):
        await grant_syncer(owner, role)
    await set_tenants(owner, enabled=True)
    session = Session(title="A's")
    save(tmp_path / "a", session)
    await drain(tmp_path / "a", dsn_a)
    await set_tenants(owner, enabled=False)
    save(tmp_path / "b", Session(session_id=session.session_id, title="B's now"))
    assert (await drain(tmp_path / "b", dsn_b)).applied == 1
    rls = await tenant_rows(
        pg_url,
        "SELECT count(*) FROM pg_class WHERE relrowsecurity AND "
        "relnamespace = 'acode'::regnamespace",
    )
    assert rls == [(0,)]


def test_the_commands_grant_migrate_and_switch_tenants(
    pg_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    role = f"acode_syncer_{secrets.token_hex(4)}"
    anyio.run(admin, pg_url, f"CREATE ROLE {role} LOGIN")
    monkeypatch.setenv("ACODE_POSTGRES_URL", pg_url)
    try:
        assert main(["db", "migrate", "--postgres", "--grant", role]) == 0
        out = capsys.readouterr().out
        assert f"granted role {role} a syncer's rights" in out
        assert f"PostgreSQL schema version 0 -> {len(load_migrations(DIALECT))}" in out
        assert main(["db", "grant", role]) == 0
        database = pg_url.rsplit("/", 1)[1]
        assert capsys.readouterr().out.splitlines() == grant_statements(role, database)
        for action in ("enable", "disable"):
            assert main(["db", "tenants", action]) == 0
            assert f"row-level security by tenant {'on' if action == 'enable' else 'off'}" in (
                capsys.readouterr().out
            )
    finally:
        anyio.run(admin, pg_url, f"DROP OWNED BY {role}; DROP ROLE {role}")


async def entity_table_scans(pg_url: str, role: str) -> dict[str, int]:
    """Sequential scans of the entity tables so far, once no backend of `role` is left
    (a backend's statistics reach the shared counters as it exits)."""
    for _ in range(500):
        if not await admin(pg_url, "SELECT 1 FROM pg_stat_activity WHERE usename = $1", role):
            break
        await anyio.sleep(0.02)
    else:
        raise AssertionError(f"a backend of {role} is still there after 10 s")
    rows = await admin(
        pg_url,
        "SELECT relname, seq_scan FROM pg_stat_all_tables WHERE schemaname = 'acode' "
        "AND relname = ANY($1::text[])",
        ["sessions", "session_events"],
    )
    return {r["relname"]: r["seq_scan"] for r in rows}


async def test_with_tenants_a_round_finds_every_row_by_its_index(
    pg_url: str, owner: PostgresTarget, new_role: NewRole, tmp_path: Path
) -> None:
    """Under row-level security a lookup by an expression the policy may not see before
    its own condition (->> on the round's JSON is not leakproof) cannot use the index: it
    would scan the whole table once per record. Creates, updates, resends and losers
    (the snapshot probe) all run here, and no entity table is scanned."""
    role, dsn = await new_role()
    await owner.ensure_schema()
    await grant_syncer(owner, role)
    await set_tenants(owner, enabled=True)
    workspace = tmp_path / "w"
    sessions = [Session(title=f"s{n}") for n in range(5)]
    save(
        workspace,
        *sessions,
        *(SessionEvent(session_id=s.session_id, event_type="started") for s in sessions),
    )
    before = await entity_table_scans(pg_url, role)
    assert (await drain(workspace, dsn)).applied == 10
    save(workspace, *(Session(session_id=s.session_id, title="renamed") for s in sessions))
    assert (await drain(workspace, dsn)).applied == 5
    run_sql(workspace, "UPDATE outbox SET state = 'pending'")  # every version again
    summary = await drain(workspace, dsn)
    assert (summary.applied, summary.duplicates, summary.conflicts) == (0, 15, 0)
    assert await entity_table_scans(pg_url, role) == before
