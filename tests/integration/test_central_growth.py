"""The central tables that grow: Citus-shaped keys, partitions by version time, retention
by whole partitions, and the in-place migration of a schema holding rows (0005 -> now)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from acode_sync import retention
from acode_sync.config import PostgresSettings, SyncSettings
from acode_sync.domain import Session, format_timestamp
from acode_sync.migrations import load_migrations
from acode_sync.partitions import ensure, list_partitions
from acode_sync.postgres import DIALECT, PostgresTarget
from acode_sync.store import WorkspaceDatabase
from acode_sync.sync import WorkspaceSyncer
from acode_sync.workspace import OpenOptions, database_path
from tests.records import enqueue_raw, run_sql, session_payload

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

KEYS_BEFORE_PARTITIONS = 5  # the last migration with one unpartitioned applied_keys


async def execute(pg_url: str, script: str) -> None:
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute(script)
    finally:
        await conn.close()


async def fetch(pg_url: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    conn = await asyncpg.connect(pg_url)
    try:
        return [tuple(r) for r in await conn.fetch(query, *args)]
    finally:
        await conn.close()


@pytest.fixture
async def target(pg_url: str) -> AsyncIterator[PostgresTarget]:
    target = PostgresTarget(PostgresSettings(dsn=pg_url))
    yield target
    await target.close()


async def make_partitions(
    pg_url: str, table: retention.PartitionedTable, *, back: timedelta
) -> None:
    """The table's partitions from `back` ago through the ones ahead (partitions.ensure)."""
    conn = await asyncpg.connect(pg_url)
    try:
        await ensure(conn, table.spec(back))
    finally:
        await conn.close()


def stamp(moment: datetime) -> str:
    return format_timestamp(moment)


def enqueue_session(workspace: Path, session_id: str, version: str, title: str) -> None:
    conn = sqlite3.connect(database_path(workspace))
    payload = json.dumps(session_payload(session_id, version, title=title))
    enqueue_raw(
        conn, f"Session:{session_id}:{version}", "Session", session_id, None, payload, version
    )
    conn.commit()
    conn.close()


def requeue(workspace: Path) -> None:
    run_sql(workspace, "UPDATE outbox SET state = 'pending', processed_at = NULL")


async def partitions_of(pg_url: str, table: str) -> dict[str, int]:
    """The rows of `table` per partition holding any."""
    rows = await fetch(
        pg_url, f"SELECT tableoid::regclass::text, count(*) FROM acode.{table} GROUP BY 1"
    )
    return {str(part).removeprefix("acode."): n for part, n in rows}


async def test_a_resend_lands_in_its_versions_partition_however_late(
    workspace: Path, target: PostgresTarget, pg_url: str
) -> None:
    """Keys of replaced versions days apart go to their own day's partitions (one older
    than every partition to the default); resent in one batch, each is found there (and
    each version held in its row): duplicates."""
    WorkspaceDatabase(workspace).close()
    now = datetime.now(UTC) - timedelta(seconds=1)
    await target.ensure_schema()
    await make_partitions(pg_url, retention.APPLIED_KEYS, back=timedelta(days=3))
    versions = [now - timedelta(days=90), now - timedelta(days=2), now]
    for n, moment in enumerate(versions):
        enqueue_session(workspace, f"sess_late{n}", stamp(moment), f"t{n}")
    for n, moment in enumerate(versions):  # each replaced a moment later
        enqueue_session(workspace, f"sess_late{n}", stamp(moment + timedelta(microseconds=1)), "v2")
    syncer = WorkspaceSyncer(workspace=workspace, target=target)
    assert (await syncer.drain()).applied == 6
    assert await partitions_of(pg_url, "applied_keys") == {
        "applied_keys_default": 1,
        f"applied_keys_p{versions[1]:%Y%m%d}": 1,
        f"applied_keys_p{now:%Y%m%d}": 1,
    }
    requeue(workspace)
    summary = await syncer.drain()
    assert (summary.applied, summary.duplicates, summary.conflicts) == (0, 6, 0)


async def test_retention_drops_whole_partitions_and_never_deletes_from_one(
    workspace: Path, target: PostgresTarget, pg_url: str
) -> None:
    """A DELETE on a day's partition would fail here (a trigger refuses it): retention
    drops the expired partitions whole, and a resend of a version held, whose day's
    partition is gone, is still a duplicate (the entity row holds its key and digest)."""
    WorkspaceDatabase(workspace).close()
    now = datetime.now(UTC)
    await target.ensure_schema()
    await make_partitions(pg_url, retention.APPLIED_KEYS, back=timedelta(days=20))
    old, recent = now - timedelta(days=20), now - timedelta(days=1)
    for version in (old, old + timedelta(microseconds=1)):  # the first replaced
        enqueue_session(workspace, "sess_old", stamp(version), "old")
    for version in (recent, recent + timedelta(microseconds=1)):
        enqueue_session(workspace, "sess_recent", stamp(version), "recent")
    syncer = WorkspaceSyncer(workspace=workspace, target=target)
    assert (await syncer.drain()).applied == 4
    await execute(
        pg_url,
        "CREATE FUNCTION acode.no_delete() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'DELETE on %', TG_TABLE_NAME; END $$",
    )
    parts = await fetch(
        pg_url,
        "SELECT c.relname FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = $1::regclass AND c.relname <> 'applied_keys_default'",
        "acode.applied_keys",
    )
    for (name,) in parts:
        await execute(
            pg_url,
            f"CREATE TRIGGER no_delete BEFORE DELETE ON acode.{name} "
            "FOR EACH STATEMENT EXECUTE FUNCTION acode.no_delete()",
        )
    assert await target.prune_applied_keys(now - timedelta(days=14)) == 1
    held = await partitions_of(pg_url, "applied_keys")
    assert held == {f"applied_keys_p{recent:%Y%m%d}": 1}
    like = "applied_keys_p%"
    names = {
        r[0]
        for r in await fetch(pg_url, "SELECT relname FROM pg_class WHERE relname LIKE $1", like)
    }
    assert f"applied_keys_p{old:%Y%m%d}" not in names
    assert f"applied_keys_p{now + timedelta(days=3):%Y%m%d}" in names  # made ahead
    latest = "SELECT max(outbox_id) FROM outbox GROUP BY entity_id"  # the versions held
    run_sql(workspace, f"UPDATE outbox SET state = 'pending' WHERE outbox_id IN ({latest})")
    summary = await syncer.drain()
    assert (summary.applied, summary.duplicates, summary.conflicts) == (0, 2, 0)


async def test_conflicts_are_dropped_by_month_only_when_asked(
    tmp_path: Path, target: PostgresTarget, pg_url: str
) -> None:
    """Conflicts of a month past sync.conflict_retention_days go with their partition;
    those of later months stay."""
    await target.ensure_schema()
    now = datetime.now(UTC)
    old = now - timedelta(days=80)
    await make_partitions(pg_url, retention.CONFLICTS, back=timedelta(days=80))
    for moment, name in ((old, "old"), (now, "new")):
        await execute(
            pg_url,
            "INSERT INTO acode.conflicts (entity_type, entity_id, session_id, incoming_key, "
            "incoming_digest, incoming_origin, incoming_updated_at, incoming_version, "
            "current_key, current_origin, current_updated_at, current_version, winner) "
            f"VALUES ('Session', 'sess_{name}', 'sess_{name}', 'k{name}', '\\x00', 'o', "
            f"'{moment}', '{{}}', 'c', 'o', '{moment}', '{{}}', 'current')",
        )
    assert await target.prune(retention.CONFLICTS, now - timedelta(days=40)) == 1
    rows = await fetch(pg_url, "SELECT entity_id FROM acode.conflicts")
    assert [r[0] for r in rows] == ["sess_new"]


# --------------------------------------------------------------------------- migration


async def previous_schema_with_rows(pg_url: str, role: str) -> None:
    """A central store at migration 0005 holding what that schema allowed: a Step and a
    ToolCall without a session (one whose parent is held, one whose is not), keys,
    a conflict without a session, a syncer role's grants, tenants enabled."""
    old = PostgresTarget(PostgresSettings(dsn=pg_url))
    try:
        await old.ensure_schema(load_migrations(DIALECT)[:KEYS_BEFORE_PARTITIONS])
    finally:
        await old.close()
    v1, v2 = "2026-01-15T10:00:00.000000Z", "2026-01-15T10:00:01.000000Z"
    meta = "'{}', 'origin-a', "
    await execute(
        pg_url,
        f"""
        INSERT INTO acode.sessions (session_id, state, created_at, updated_at, extra,
            origin_id, idempotency_key)
        VALUES ('sess_a', 'CREATED', '{v1}', '{v1}', {meta}'Session:sess_a:{v1}');
        INSERT INTO acode.session_tasks (task_id, session_id, status, created_at, updated_at,
            extra, origin_id, idempotency_key)
        VALUES ('task_a', 'sess_a', 'pending', '{v1}', '{v1}', {meta}'SessionTask:task_a:{v1}');
        INSERT INTO acode.steps (step_id, task_id, session_id, status, created_at, updated_at,
            extra, origin_id, idempotency_key)
        VALUES ('step_a', 'task_a', NULL, 'pending', '{v1}', '{v1}', {meta}'Step:step_a:{v1}'),
               ('step_orphan', 'task_gone', NULL, 'pending', '{v1}', '{v1}', {meta}
                'Step:step_orphan:{v1}');
        INSERT INTO acode.tool_calls (tool_call_id, step_id, session_id, name, created_at,
            updated_at, extra, origin_id, idempotency_key)
        VALUES ('tc_a', 'step_a', NULL, 'bash', '{v1}', '{v1}', {meta}'ToolCall:tc_a:{v1}');
        INSERT INTO acode.applied_keys (idempotency_key, payload_digest, origin_id)
        VALUES ('Session:sess_a:{v1}', '\\x01', 'origin-a'),
               ('Step:step_a:{v1}', '\\x02', 'origin-a'),
               ('Step:step_orphan:{v1}', '\\x03', 'origin-a'),
               ('Session:sess_a:{v2}', '\\x04', 'origin-a');
        INSERT INTO acode.conflicts (entity_type, entity_id, session_id, incoming_key,
            incoming_digest, incoming_origin, incoming_updated_at, incoming_version,
            current_key, current_origin, current_updated_at, current_version, winner)
        VALUES ('Step', 'step_a', NULL, 'Step:step_a:{v2}', '\\x05', 'origin-b', '{v2}', '{{}}',
                'Step:step_a:{v1}', 'origin-a', '{v1}', '{{}}', 'current');
        GRANT SELECT, INSERT, DELETE ON acode.applied_keys TO {role};
        GRANT SELECT, INSERT ON acode.conflicts TO {role};
        ALTER TABLE acode.applied_keys ENABLE ROW LEVEL SECURITY;
        CREATE POLICY tenant_rows ON acode.applied_keys
            USING (tenant = current_user) WITH CHECK (tenant = current_user);
        """,
    )


# Where the database reads a backslash in a string as an escape, the migration's pattern
# (\d) and the round's literals must still read as written.
_STRINGS_NOT_STANDARD = (
    "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET standard_conforming_strings = off', "
    "current_database()); END $$"
)


@pytest.mark.parametrize("standard_strings", [True, False])
async def test_a_populated_schema_migrates_in_place(
    target: PostgresTarget, pg_url: str, workspace: Path, standard_strings: bool
) -> None:
    role = "acode_growth_syncer"
    await execute(pg_url, f"DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN")
    if not standard_strings:
        await execute(pg_url, _STRINGS_NOT_STANDARD)
    try:
        await previous_schema_with_rows(pg_url, role)
        await target.ensure_schema()
        steps = await fetch(pg_url, "SELECT step_id, session_id FROM acode.steps ORDER BY 1")
        assert list(steps) == [("step_a", "sess_a"), ("step_orphan", "")]
        calls = await fetch(pg_url, "SELECT session_id FROM acode.tool_calls")
        assert [r[0] for r in calls] == ["sess_a"]
        keys = await fetch(
            pg_url,
            "SELECT idempotency_key, session_id, version, tableoid::regclass::text "
            "FROM acode.applied_keys ORDER BY 1",
        )
        version = datetime(2026, 1, 15, 10, tzinfo=UTC)
        assert list(keys) == [
            (
                "Session:sess_a:2026-01-15T10:00:00.000000Z",
                "sess_a",
                version,
                "acode.applied_keys_default",
            ),
            (
                "Session:sess_a:2026-01-15T10:00:01.000000Z",
                "sess_a",
                version + timedelta(seconds=1),
                "acode.applied_keys_default",
            ),
            (
                "Step:step_a:2026-01-15T10:00:00.000000Z",
                "sess_a",
                version,
                "acode.applied_keys_default",
            ),
            (
                "Step:step_orphan:2026-01-15T10:00:00.000000Z",
                "",
                version,
                "acode.applied_keys_default",
            ),
        ]
        conflicts = await fetch(pg_url, "SELECT conflict_id, session_id FROM acode.conflicts")
        assert list(conflicts) == [(1, "")]
        facts = await fetch(
            pg_url,
            "SELECT c.relname, c.relkind::text, c.relrowsecurity, "
            "has_table_privilege($1, c.oid, 'INSERT') AS may_insert "
            "FROM pg_class AS c WHERE c.relname IN ('applied_keys', 'conflicts') "
            "AND c.relnamespace = 'acode'::regnamespace ORDER BY 1",
            role,
        )
        assert list(facts) == [
            ("applied_keys", "p", True, True),
            ("conflicts", "p", False, True),
        ]
        primary = await fetch(
            pg_url,
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conrelid = 'acode.steps'::regclass AND contype IN ('p', 'u') "
            "ORDER BY contype",
        )
        assert [r[0] for r in primary] == ["PRIMARY KEY (session_id, step_id)", "UNIQUE (step_id)"]
        # An older version of the session is a conflict, recorded under the next id.
        WorkspaceDatabase(workspace).close()
        enqueue_session(workspace, "sess_a", "2026-01-15T09:00:00.000000Z", "older")
        summary = await WorkspaceSyncer(workspace=workspace, target=target).drain()
        assert (summary.applied, summary.conflicts) == (0, 1)
        ids = await fetch(pg_url, "SELECT conflict_id FROM acode.conflicts ORDER BY 1")
        assert [r[0] for r in ids] == [1, 2]
    finally:
        await target.close()
        await execute(pg_url, f"DROP OWNED BY {role}; DROP ROLE {role}")


# --------------------------------------------------------------------------- the workspace


def test_the_workspace_refuses_to_move_an_entity_to_another_session(workspace: Path) -> None:
    from acode_sync.domain import SessionTask
    from acode_sync.errors import RecordRejectedError

    db = WorkspaceDatabase(workspace)
    try:
        first, second = db.save(Session()), db.save(Session())
        task = db.save(SessionTask(session_id=first.session_id, title="t"))
        with pytest.raises(RecordRejectedError, match="session is fixed at creation"):
            db.save(SessionTask(task_id=task.task_id, session_id=second.session_id, title="t"))
    finally:
        db.close()
    tasks = run_sql(workspace, "SELECT session_id FROM session_tasks")
    assert tasks == [(first.session_id,)]


def test_every_outbox_record_carries_its_session(workspace: Path) -> None:
    """A plain-SQL writer's Step and ToolCall records without a session take their
    parents' (as the workspace holds them when enqueued)."""
    db = WorkspaceDatabase(workspace, OpenOptions())
    from acode_sync.domain import SessionTask

    session = db.save(Session())
    task = db.save(SessionTask(session_id=session.session_id))
    db.close()
    v = "2026-01-15T10:00:00.000000Z"
    conn = sqlite3.connect(database_path(workspace))
    conn.execute(
        "INSERT INTO steps (step_id, task_id, session_id, status, created_at, updated_at) "
        "VALUES ('step_x', ?, NULL, 'pending', ?, ?)",
        (task.task_id, v, v),
    )
    step = json.dumps({"step_id": "step_x", "task_id": task.task_id, "status": "pending"})
    call = json.dumps({"tool_call_id": "tc_x", "step_id": "step_x", "name": "bash"})
    enqueue_raw(conn, f"Step:step_x:{v}", "Step", "step_x", None, step, v)
    enqueue_raw(conn, f"ToolCall:tc_x:{v}", "ToolCall", "tc_x", None, call, v)
    enqueue_raw(conn, f"ToolCall:tc_y:{v}", "ToolCall", "tc_y", None, "not json", v)
    conn.commit()
    conn.close()
    rows = run_sql(
        workspace,
        "SELECT entity_id, session_id FROM outbox WHERE entity_type IN ('Step', 'ToolCall') "
        "ORDER BY outbox_id",
    )
    assert rows == [("step_x", session.session_id), ("tc_x", session.session_id), ("tc_y", None)]


async def test_a_record_without_any_session_is_a_dead_letter_with_the_reason(
    workspace: Path, target: PostgresTarget
) -> None:
    WorkspaceDatabase(workspace).close()
    v = "2026-01-15T10:00:00.000000Z"
    conn = sqlite3.connect(database_path(workspace))
    call = json.dumps({"tool_call_id": "tc_z", "step_id": "step_gone", "name": "bash"})
    enqueue_raw(conn, f"ToolCall:tc_z:{v}", "ToolCall", "tc_z", None, call, v)
    conn.commit()
    conn.close()
    settings = SyncSettings(max_attempts=1)
    summary = await WorkspaceSyncer(workspace=workspace, target=target, settings=settings).drain()
    assert summary.dead == 1
    [(error,)] = run_sql(workspace, "SELECT last_error FROM outbox")
    assert "names no session" in error


async def test_the_daemons_hourly_retention_drops_keys_and_conflicts_when_asked(
    tmp_path: Path, pg_url: str
) -> None:
    from acode_sync.config import Config, DaemonSettings
    from acode_sync.daemon import Daemon

    now = datetime.now(UTC)
    old = now - timedelta(days=80)
    setup = PostgresTarget(PostgresSettings(dsn=pg_url))
    try:
        await setup.ensure_schema()
    finally:
        await setup.close()
    await make_partitions(pg_url, retention.CONFLICTS, back=timedelta(days=80))
    await make_partitions(pg_url, retention.APPLIED_KEYS, back=timedelta(days=80))
    await execute(
        pg_url,
        "INSERT INTO acode.applied_keys (session_id, idempotency_key, version, payload_digest, "
        f"origin_id) VALUES ('sess_o', 'Session:sess_o:x', '{old}', '\\x00', 'o'); "
        "INSERT INTO acode.conflicts (entity_type, entity_id, session_id, incoming_key, "
        "incoming_digest, incoming_origin, incoming_updated_at, incoming_version, "
        "current_key, current_origin, current_updated_at, current_version, winner) "
        f"VALUES ('Session', 'sess_o', 'sess_o', 'k', '\\x00', 'o', '{old}', '{{}}', 'c', "
        f"'o', '{old}', '{{}}', 'current')",
    )

    async def run(conflict_days: float, dsn: str) -> None:
        config = Config(
            postgres=PostgresSettings(dsn=dsn, connect_timeout=2.0),
            sync=SyncSettings(conflict_retention_days=conflict_days),
            daemon=DaemonSettings(roots=(tmp_path,), state_dir=tmp_path / "state"),
        )
        daemon = Daemon(config, config_path=None, environ={}, cwd=tmp_path)
        try:
            await daemon.prune_once()
        finally:
            await daemon.shared.target.close()

    await run(0.0, pg_url)  # conflicts kept for ever
    counts = await fetch(
        pg_url, "SELECT (SELECT count(*) FROM acode.applied_keys), count(*) FROM acode.conflicts"
    )
    assert counts == [(0, 1)]
    await run(30.0, pg_url)
    assert await fetch(pg_url, "SELECT count(*) FROM acode.conflicts") == [(0,)]
    await run(30.0, "postgresql://postgres@127.0.0.1:1/none")  # unreachable: logged, no raise


async def test_the_daemons_hourly_retention_survives_a_schema_it_does_not_know(
    tmp_path: Path, pg_url: str
) -> None:
    """A schema newer than this daemon (another host upgraded first) is the prune's
    refusal, logged: it never ends the daemon."""
    from acode_sync.config import Config, DaemonSettings
    from acode_sync.daemon import Daemon

    setup = PostgresTarget(PostgresSettings(dsn=pg_url))
    try:
        await setup.ensure_schema()
    finally:
        await setup.close()
    await execute(
        pg_url,
        "INSERT INTO acode.schema_migrations (version, name, checksum) VALUES (99, 'later', 'x')",
    )
    config = Config(
        postgres=PostgresSettings(dsn=pg_url, connect_timeout=2.0),
        daemon=DaemonSettings(roots=(tmp_path,), state_dir=tmp_path / "state"),
    )
    daemon = Daemon(config, config_path=None, environ={}, cwd=tmp_path)
    try:
        await daemon.prune_once()  # logged, no raise
    finally:
        await daemon.shared.target.close()


def test_acode_db_prune_runs_the_retention_as_the_owner(pg_url: str) -> None:
    from tests.daemon_harness import ACODE, child_env, run_cli

    done = run_cli(ACODE, "db", "prune", env=child_env(ACODE_POSTGRES_URL=pg_url))
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        "applied_keys: 0 row(s) older than 14 days forgotten\n"
        "conflicts: kept forever; partitions made ahead\n"
    )


async def test_conflicts_kept_forever_still_get_their_partitions_ahead(pg_url: str) -> None:
    """With no conflict retention (the default) the hourly prune still makes the months
    ahead: months after the migration, new conflicts land in their own partitions, not all
    in the DEFAULT one."""
    from tests.daemon_harness import ACODE, child_env, run_cli

    setup = PostgresTarget(PostgresSettings(dsn=pg_url))
    try:
        await setup.ensure_schema()
    finally:
        await setup.close()
    conn = await asyncpg.connect(pg_url)
    try:
        spec = retention.CONFLICTS.spec(timedelta(days=1))
        for partition in await list_partitions(conn, spec):
            if partition.start is not None:  # as if the migration's months ahead had passed
                await conn.execute(f"DROP TABLE acode.{partition.name}")
    finally:
        await conn.close()
    done = run_cli(ACODE, "db", "prune", env=child_env(ACODE_POSTGRES_URL=pg_url))
    assert done.returncode == 0, done.stderr
    later = stamp(datetime.now(UTC) + timedelta(days=35))
    await execute(
        pg_url,
        "INSERT INTO acode.conflicts (entity_type, entity_id, session_id, incoming_key, "
        "incoming_digest, incoming_origin, incoming_updated_at, incoming_version, "
        "current_key, current_origin, current_updated_at, current_version, winner) "
        f"VALUES ('Session', 'sess_f', 'sess_f', 'k', '\\x00', 'o', '{later}', '{{}}', 'c', "
        f"'o', '{later}', '{{}}', 'current')",
    )
    held = await fetch(pg_url, "SELECT tableoid::regclass::text FROM acode.conflicts")
    assert len(held) == 1
    assert held[0][0] != "acode.conflicts_default", held


def test_the_workspace_migration_gives_queued_records_their_session(workspace: Path) -> None:
    """Records queued at schema 5 without a session are given it by migration 6, from the
    payload or the parent the workspace holds; a workspace row's session then never
    changes."""
    from acode_sync.workspace import migrate, open_workspace

    shipped = load_migrations("sqlite")
    conn = open_workspace(workspace, run_migrations=False)
    try:
        assert migrate(conn, available=shipped[:5]) == (0, 5)
        v = "2026-01-15T10:00:00.000000Z"
        conn.execute(
            "INSERT INTO sessions (session_id, created_at, updated_at) VALUES ('sess_m', ?, ?)",
            (v, v),
        )
        conn.execute(
            "INSERT INTO session_tasks (task_id, session_id, status, created_at, updated_at) "
            "VALUES ('task_m', 'sess_m', 'pending', ?, ?)",
            (v, v),
        )
        step = json.dumps({"step_id": "step_m", "task_id": "task_m"})
        event = json.dumps({"event_id": "evt_m", "session_id": "sess_m"})
        enqueue_raw(conn, f"Step:step_m:{v}", "Step", "step_m", None, step, v)
        enqueue_raw(conn, f"SessionEvent:evt_m:{v}", "SessionEvent", "evt_m", None, event, v)
        conn.commit()
        assert migrate(conn, available=shipped) == (5, len(shipped))
        rows = conn.execute("SELECT entity_id, session_id FROM outbox ORDER BY 1").fetchall()
        assert rows == [("evt_m", "sess_m"), ("step_m", "sess_m")]
        with pytest.raises(sqlite3.IntegrityError, match="session is fixed at creation"):
            conn.execute("UPDATE session_tasks SET session_id = 'sess_other'")
    finally:
        conn.close()


async def test_retention_gives_up_rather_than_hold_up_the_batches(
    target: PostgresTarget, pg_url: str
) -> None:
    """A transaction writing applied_keys holds its lock: the retention's DETACH gives up
    after its lock timeout (55P03, the server's state) and drops nothing."""
    from acode_sync.errors import PostgresRefusedError

    await target.ensure_schema()
    await make_partitions(pg_url, retention.APPLIED_KEYS, back=timedelta(days=20))
    holder = await asyncpg.connect(pg_url)
    try:
        await holder.execute("BEGIN; LOCK TABLE acode.applied_keys IN ROW EXCLUSIVE MODE")
        with pytest.raises(PostgresRefusedError, match="55P03"):
            await target.prune_applied_keys(datetime.now(UTC) - timedelta(days=14))
    finally:
        await holder.close()
    held = await fetch(
        pg_url,
        "SELECT count(*) FROM pg_inherits WHERE inhparent = 'acode.applied_keys'::regclass",
    )
    assert held[0][0] > 7  # nothing was dropped


async def test_an_explicit_migration_is_not_bound_by_the_statement_timeout(pg_url: str) -> None:
    """`acode db migrate --postgres` waits for a migration that rewrites large tables;
    four statement timeouts (40 ms here) would not cover even an empty schema's."""
    target = PostgresTarget(PostgresSettings(dsn=pg_url, statement_timeout=0.01))
    try:
        assert await target.ensure_schema(explicit=True) == (0, len(load_migrations(DIALECT)))
    finally:
        await target.close()


async def test_an_automatic_migration_past_its_time_says_to_migrate_explicitly(
    pg_url: str,
) -> None:
    """An automatic migration that cannot finish within four statement timeouts (here: the
    migration lock held elsewhere) is rolled back, and the error says what to do, not
    that PostgreSQL is unreachable."""
    from acode_sync.errors import PostgresUnavailableError
    from acode_sync.postgres import LOCK_NAMESPACE, MIGRATION_LOCK

    holder = await asyncpg.connect(pg_url)
    target = PostgresTarget(PostgresSettings(dsn=pg_url, statement_timeout=0.25))
    try:
        await holder.execute("SELECT pg_advisory_lock($1, $2)", LOCK_NAMESPACE, MIGRATION_LOCK)
        with pytest.raises(PostgresUnavailableError) as timed_out:
            await target.ensure_schema()
        assert timed_out.value.code == "ACODE-DB-005"
        assert "the schema's migration did not finish within 1 s" in timed_out.value.message
        assert "acode db migrate --postgres" in (timed_out.value.hint or "")
    finally:
        await target.close()
        await holder.close()
    assert await fetch(pg_url, "SELECT to_regclass('acode.schema_migrations')") == [(None,)]


async def test_an_ancient_conflict_does_not_make_a_partition_for_every_month_since(
    pg_url: str,
) -> None:
    """Migration 7 makes conflict months from at most a year back: one conflict dated 1970
    would otherwise make 687 partitions. It is kept, in the DEFAULT partition."""
    old = PostgresTarget(PostgresSettings(dsn=pg_url))
    try:
        await old.ensure_schema(load_migrations(DIALECT)[:KEYS_BEFORE_PARTITIONS])
    finally:
        await old.close()
    ancient = "1970-01-01T00:00:00.000000Z"
    await execute(
        pg_url,
        "INSERT INTO acode.conflicts (entity_type, entity_id, session_id, incoming_key, "
        "incoming_digest, incoming_origin, incoming_updated_at, incoming_version, "
        "current_key, current_origin, current_updated_at, current_version, winner) "
        f"VALUES ('Session', 'sess_o', 'sess_o', 'Session:sess_o:{ancient}', '\\x00', 'o', "
        f"'{ancient}', '{{}}', 'c', 'o', '{ancient}', '{{}}', 'current')",
    )
    new = PostgresTarget(PostgresSettings(dsn=pg_url))
    try:
        await new.ensure_schema(explicit=True)
    finally:
        await new.close()
    months = await fetch(
        pg_url,
        "SELECT count(*) FROM pg_inherits WHERE inhparent = 'acode.conflicts'::regclass",
    )
    assert months[0][0] <= 16  # 12 back, this one, 2 ahead, and the DEFAULT partition
    held = await fetch(pg_url, "SELECT tableoid::regclass::text FROM acode.conflicts")
    assert held == [("acode.conflicts_default",)]
