"""The guarantees under ordinary faults (docs/reliability.md): a server that refuses the
work charges no record, concurrent batches of one entity record every overlap, a resend
after its applied key was pruned is a duplicate, bad payload times fail their record.
Real workspaces, the real PostgreSQL, real roles."""

from __future__ import annotations

import json
import secrets
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest

from acode_sync.config import PostgresSettings, SyncSettings
from acode_sync.domain import Session, format_timestamp, utc_now
from acode_sync.errors import PostgresRefusedError, PostgresUnavailableError
from acode_sync.postgres import PostgresTarget
from acode_sync.store import WorkspaceDatabase
from acode_sync.sync import WorkspaceSyncer
from acode_sync.workspace import database_path
from tests.pg import database_url
from tests.records import enqueue_raw, run_sql, session_payload

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

SETTINGS: dict[str, Any] = {"max_attempts": 2, "retry_base_seconds": 0.0, "retry_cap_seconds": 0.0}


async def admin(pg_url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    """Run `sql` as the owner: a query with arguments, or a script of statements."""
    conn = await asyncpg.connect(pg_url)
    try:
        if args or sql.lstrip().upper().startswith("SELECT"):
            return list(await conn.fetch(sql, *args))
        await conn.execute(sql)
        return []
    finally:
        await conn.close()


@pytest.fixture
async def syncer_role(pg_url: str) -> AsyncIterator[tuple[str, str]]:
    """A login role with a syncer's rights on a migrated central schema: (role, its DSN)."""
    owner = PostgresTarget(PostgresSettings(dsn=pg_url))
    await owner.ensure_schema()
    await owner.close()
    role = f"acode_syncer_{secrets.token_hex(4)}"
    await admin(
        pg_url,
        f"CREATE ROLE {role} LOGIN; GRANT USAGE ON SCHEMA acode TO {role}; "
        f"GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA acode TO {role};",
    )
    database = pg_url.rsplit("/", 1)[1]
    yield role, database_url(database).replace("postgres@", f"{role}@", 1)
    await admin(pg_url, f"DROP OWNED BY {role}; DROP ROLE {role}")


def write_sessions(workspace: Path, count: int) -> None:
    db = WorkspaceDatabase(workspace)
    try:
        for n in range(count):
            db.save(Session(title=f"s{n}"))
    finally:
        db.close()


def charged(workspace: Path) -> list[tuple[str, int]]:
    """Records that used an attempt or died, and the errors recorded."""
    return run_sql(
        workspace,
        "SELECT state, attempts FROM outbox WHERE attempts > 0 OR state = 'dead' "
        "UNION ALL SELECT 'error', count(*) FROM outbox_errors HAVING count(*) > 0",
    )


Refusal = Callable[[str, str, list[Any]], Awaitable[None]]


async def read_only(pg_url: str, role: str, held: list[Any]) -> None:
    await admin(pg_url, f"ALTER ROLE {role} SET default_transaction_read_only = on")


async def revoked(pg_url: str, role: str, held: list[Any]) -> None:
    await admin(pg_url, f"REVOKE INSERT, UPDATE ON acode.sessions FROM {role}")


async def locked(pg_url: str, role: str, held: list[Any]) -> None:
    """An administrator's lock on a table, held for the whole refusal."""
    conn = await asyncpg.connect(pg_url)
    await conn.execute("BEGIN; LOCK TABLE acode.sessions IN ACCESS EXCLUSIVE MODE")
    held.append(conn)


async def no_connections(pg_url: str, role: str, held: list[Any]) -> None:
    await admin(pg_url, f"ALTER ROLE {role} CONNECTION LIMIT 0")


async def repair(pg_url: str, role: str, held: list[Any]) -> None:
    for conn in held:
        await conn.close()
    await admin(
        pg_url,
        f"ALTER ROLE {role} RESET ALL; ALTER ROLE {role} CONNECTION LIMIT -1; "
        f"GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA acode TO {role}",
    )


@pytest.mark.parametrize(
    ("refuse", "sqlstate"),
    [(read_only, "25006"), (revoked, "42501"), (locked, "55P03"), (no_connections, "53300")],
    ids=["read-only", "revoked-grant", "admin-lock", "too-many-connections"],
)
async def test_a_server_that_refuses_the_work_charges_no_record(
    workspace: Path,
    pg_url: str,
    syncer_role: tuple[str, str],
    refuse: Refusal,
    sqlstate: str,
) -> None:
    role, role_dsn = syncer_role
    write_sessions(workspace, 30)
    held: list[Any] = []
    await refuse(pg_url, role, held)
    settings = PostgresSettings(dsn=role_dsn, statement_timeout=1.0, connect_timeout=5)
    target = PostgresTarget(settings)
    syncer = WorkspaceSyncer(workspace=workspace, target=target, settings=SyncSettings(**SETTINGS))
    try:
        # Well past the strikes that isolate a suspect batch and the records' attempts.
        for _ in range(8):
            with pytest.raises(PostgresRefusedError) as refused:
                await syncer.drain()
            assert refused.value.sqlstate == sqlstate
            assert f"SQLSTATE {sqlstate}" in refused.value.message
        assert charged(workspace) == []
        await repair(pg_url, role, held)
        summary = await syncer.drain()  # the same syncer and pool: no operator action
        assert (summary.applied, summary.retried, summary.dead, summary.backlog) == (30, 0, 0, 0)
    finally:
        await target.close()
        for conn in held:
            await conn.close()
    assert (await admin(pg_url, "SELECT count(*) FROM acode.sessions"))[0][0] == 30


async def test_a_statement_timeout_on_every_record_alone_is_an_outage(
    workspace: Path, pg_url: str
) -> None:
    """A failure that may follow a record (a statement timeout) but follows every record
    sent alone is the server's: nothing is charged."""
    target = PostgresTarget(PostgresSettings(dsn=pg_url, statement_timeout=0.3))
    await target.ensure_schema()
    await admin(
        pg_url,
        "CREATE FUNCTION acode.slow() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN PERFORM pg_sleep(1); RETURN NEW; END $$; "
        "CREATE TRIGGER slow BEFORE INSERT ON acode.sessions "
        "FOR EACH ROW EXECUTE FUNCTION acode.slow()",
    )
    write_sessions(workspace, 4)
    syncer = WorkspaceSyncer(workspace=workspace, target=target, settings=SyncSettings(**SETTINGS))
    try:
        for _ in range(6):
            with pytest.raises(PostgresUnavailableError):
                await syncer.drain()
        assert charged(workspace) == []
        await admin(pg_url, "DROP TRIGGER slow ON acode.sessions")
        assert (await syncer.drain()).applied == 4
    finally:
        await target.close()


def origin_workspace(root: Path, origin: str) -> Path:
    workspace = root / origin
    workspace.mkdir()
    WorkspaceDatabase(workspace).close()
    run_sql(workspace, "UPDATE workspace_meta SET value = ? WHERE key = 'origin_id'", (origin,))
    return workspace


def enqueue_task(
    workspace: Path,
    task_id: str,
    session_id: str,
    stamp: str,
    base: str | None,
    *,
    record_session: str | None = None,
) -> None:
    """A task's record; `record_session` is the outbox record's own session column (the
    one a batch locks), the payload's session_id by default."""
    payload = {"task_id": task_id, "session_id": session_id, "status": workspace.name}
    payload |= {"created_at": "2026-01-15T10:00:00.000000Z", "updated_at": stamp}
    conn = sqlite3.connect(database_path(workspace))
    enqueue_raw(
        conn,
        f"SessionTask:{task_id}:{stamp}",
        "SessionTask",
        task_id,
        record_session or session_id,
        json.dumps(payload),
        stamp,
    )
    if base is not None:
        conn.execute("UPDATE outbox_records SET base_updated_at = ?", (base,))
    conn.commit()
    conn.close()


@pytest.mark.parametrize(
    ("existing", "b_stamp", "winner"),
    [
        # Both create it; b's is older: it loses to a's, which it never saw.
        (False, "2026-01-15T10:00:00.500000Z", "current"),
        # Both change the version held; b's is newer, and not based on a's.
        (True, "2026-01-15T10:00:02.000000Z", "incoming"),
    ],
    ids=["new-entity", "existing-entity"],
)
async def test_concurrent_batches_of_one_entity_under_other_locks_record_the_overlap(
    tmp_path: Path, pg_url: str, existing: bool, b_stamp: str, winner: str
) -> None:
    """One task drained from two workspaces at once, their records naming other sessions
    in their own column (so the batches take other session locks): b's write is judged
    against a's (in flight when b's batch starts), whichever lock each batch took."""
    base = "2026-01-15T10:00:00.000000Z"
    target = PostgresTarget(PostgresSettings(dsn=pg_url, statement_timeout=10))
    await target.ensure_schema()
    if existing:
        first = origin_workspace(tmp_path, "origin-0")
        enqueue_task(first, "task_moved", "sess_x", base, None, record_session="sess_0")
        assert (await WorkspaceSyncer(workspace=first, target=target).drain()).applied == 1
    # Origin a's batch holds its row (uncommitted) for a moment, so that b's batch runs
    # while a's is in flight.
    await admin(
        pg_url,
        "CREATE FUNCTION acode.hold() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN PERFORM pg_sleep(1); RETURN NULL; END $$; "
        "CREATE TRIGGER hold AFTER INSERT OR UPDATE ON acode.session_tasks "
        "FOR EACH ROW WHEN (NEW.origin_id = 'origin-a') EXECUTE FUNCTION acode.hold()",
    )
    a, b = origin_workspace(tmp_path, "origin-a"), origin_workspace(tmp_path, "origin-b")
    parent = base if existing else None
    stamp = "2026-01-15T10:00:01.000000Z"
    enqueue_task(a, "task_moved", "sess_x", stamp, parent, record_session="sess_a")
    enqueue_task(b, "task_moved", "sess_x", b_stamp, parent, record_session="sess_b")
    summaries = {}

    async def drain(workspace: Path, delay: float) -> None:
        await anyio.sleep(delay)
        syncer = WorkspaceSyncer(workspace=workspace, target=target)
        summaries[workspace.name] = await syncer.drain()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(drain, a, 0.0)
            tg.start_soon(drain, b, 0.3)
    finally:
        await target.close()
    conflicts = await admin(
        pg_url,
        "SELECT incoming_origin, current_origin, winner FROM acode.conflicts "
        "WHERE entity_id = 'task_moved'",
    )
    assert [tuple(c) for c in conflicts] == [("origin-b", "origin-a", winner)]
    assert summaries["origin-b"].conflicts == 1
    [row] = await admin(pg_url, "SELECT session_id, status FROM acode.session_tasks")
    assert tuple(row) == ("sess_x", "origin-b" if winner == "incoming" else "origin-a")


def last_errors(workspace: Path) -> list[tuple[str, int, str]]:
    return run_sql(workspace, "SELECT state, attempts, last_error FROM outbox ORDER BY outbox_id")


async def test_a_version_naming_another_session_is_a_dead_letter_never_a_second_row(
    tmp_path: Path, pg_url: str
) -> None:
    """An entity's session is fixed at creation: a version under another session fails
    its record with the reason (retried, then dead), and the row held stays as it was."""
    target = PostgresTarget(PostgresSettings(dsn=pg_url))
    first, other = origin_workspace(tmp_path, "origin-a"), origin_workspace(tmp_path, "origin-b")
    enqueue_task(first, "task_fixed", "sess_a", "2026-01-15T10:00:00.000000Z", None)
    enqueue_task(other, "task_fixed", "sess_b", "2026-01-15T10:00:05.000000Z", None)
    settings = SyncSettings(**SETTINGS)
    try:
        assert (await WorkspaceSyncer(workspace=first, target=target).drain()).applied == 1
        syncer = WorkspaceSyncer(workspace=other, target=target, settings=settings)
        summary = await syncer.drain()
        assert (summary.applied, summary.dead) == (0, 1)
    finally:
        await target.close()
    [(state, attempts, error)] = last_errors(other)
    assert (state, attempts) == ("dead", 2)
    assert (
        "SessionTask task_fixed belongs to session sess_a; a version naming session sess_b is "
        "refused (an entity's session is fixed at creation)"
    ) in error
    rows = await admin(pg_url, "SELECT session_id, status FROM acode.session_tasks")
    assert [tuple(r) for r in rows] == [("sess_a", "origin-a")]
    assert (await admin(pg_url, "SELECT count(*) FROM acode.conflicts"))[0][0] == 0


async def test_a_new_entity_created_meanwhile_under_another_session_fails_visibly(
    tmp_path: Path, pg_url: str
) -> None:
    """Two origins create one entity under two sessions at once: the second to commit
    meets the first's row on the entity id's unique key (never a second row); its retry
    names the session held."""
    target = PostgresTarget(PostgresSettings(dsn=pg_url, statement_timeout=10))
    await target.ensure_schema()
    await admin(
        pg_url,
        "CREATE FUNCTION acode.hold() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN PERFORM pg_sleep(1); RETURN NULL; END $$; "
        "CREATE TRIGGER hold AFTER INSERT ON acode.session_tasks "
        "FOR EACH ROW WHEN (NEW.origin_id = 'origin-a') EXECUTE FUNCTION acode.hold()",
    )
    a, b = origin_workspace(tmp_path, "origin-a"), origin_workspace(tmp_path, "origin-b")
    enqueue_task(a, "task_twice", "sess_a", "2026-01-15T10:00:01.000000Z", None)
    enqueue_task(b, "task_twice", "sess_b", "2026-01-15T10:00:02.000000Z", None)
    settings = SyncSettings(**SETTINGS)

    async def drain(workspace: Path, delay: float) -> None:
        await anyio.sleep(delay)
        await WorkspaceSyncer(workspace=workspace, target=target, settings=settings).drain()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(drain, a, 0.0)
            tg.start_soon(drain, b, 0.3)
    finally:
        await target.close()
    rows = await admin(pg_url, "SELECT session_id, status FROM acode.session_tasks")
    assert [tuple(r) for r in rows] == [("sess_a", "origin-a")]
    [(state, _, error)] = last_errors(b)
    assert state == "dead"
    assert "belongs to session sess_a; a version naming session sess_b is refused" in error


async def test_another_unique_index_on_an_entity_table_refuses_the_records_not_a_race(
    workspace: Path, pg_url: str
) -> None:
    """Only a violation of an entity's primary key or id means that another transaction
    created it meanwhile (judged again); a unique index an administrator added refuses the
    records that break it, which are isolated and charged."""
    target = PostgresTarget(PostgresSettings(dsn=pg_url))
    await target.ensure_schema()
    await admin(pg_url, "CREATE UNIQUE INDEX one_per_state ON acode.sessions (state)")
    write_sessions(workspace, 3)  # all three CREATED
    syncer = WorkspaceSyncer(workspace=workspace, target=target, settings=SyncSettings(**SETTINGS))
    try:
        summary = await syncer.drain()
    finally:
        await target.close()
    assert summary.applied == 1
    assert summary.retried + summary.dead >= 2
    assert (await admin(pg_url, "SELECT count(*) FROM acode.sessions"))[0][0] == 1


async def test_a_resend_after_its_applied_key_was_pruned_is_a_duplicate(
    workspace: Path, pg_url: str
) -> None:
    """Pruned are the keys of versions replaced; the version held keeps its key in its row,
    so a late resend of what each entity holds is still a duplicate."""
    target = PostgresTarget(PostgresSettings(dsn=pg_url))
    write_sessions(workspace, 3)
    db = WorkspaceDatabase(workspace)
    try:
        for (session_id,) in run_sql(workspace, "SELECT session_id FROM sessions"):
            db.save(Session(session_id=session_id, title="renamed"))
    finally:
        db.close()
    syncer = WorkspaceSyncer(workspace=workspace, target=target)
    try:
        assert (await syncer.drain()).applied == 6
        future = utc_now().replace(year=utc_now().year + 1)
        assert await target.prune_applied_keys(future) == 3  # the three replaced versions
        latest = "SELECT max(outbox_id) FROM outbox GROUP BY entity_id"
        run_sql(workspace, f"UPDATE outbox SET state = 'pending' WHERE outbox_id IN ({latest})")
        summary = await syncer.drain()
    finally:
        await target.close()
    assert (summary.applied, summary.duplicates, summary.conflicts) == (0, 3, 0)
    assert (await admin(pg_url, "SELECT count(*) FROM acode.conflicts"))[0][0] == 0


@pytest.mark.parametrize(
    "created_at",
    [
        "yesterday",
        "infinity",
        "epoch",
        "2026-01-15T10:30:00.000000",  # no zone: read in the server's time zone
        "2026-01-15T10:30:00+02:00",
        "2026-01-15T24:00:00.000000Z",
    ],
)
async def test_a_payload_time_that_is_not_canonical_fails_its_record_alone(
    workspace: Path, pg_url: str, created_at: str
) -> None:
    WorkspaceDatabase(workspace).close()
    stamp = format_timestamp(utc_now())
    conn = sqlite3.connect(database_path(workspace))
    for session_id, created in (("sess_bad", created_at), ("sess_good", stamp)):
        payload = json.dumps(session_payload(session_id, stamp, created_at=created))
        enqueue_raw(
            conn, f"Session:{session_id}:{stamp}", "Session", session_id, session_id, payload, stamp
        )
    conn.commit()
    conn.close()
    target = PostgresTarget(PostgresSettings(dsn=pg_url))
    try:
        summary = await WorkspaceSyncer(workspace=workspace, target=target).drain()
    finally:
        await target.close()
    assert (summary.applied, summary.retried) == (1, 1)
    [(error,)] = run_sql(workspace, "SELECT last_error FROM outbox WHERE state = 'pending'")
    assert "created_at is not a canonical RFC 3339 UTC time" in error
    assert [r[0] for r in await admin(pg_url, "SELECT session_id FROM acode.sessions")] == [
        "sess_good"
    ]
