"""The sync engine behind a real PgBouncer in transaction pooling (tests/bouncer.py): the
normal path, the central migration, the session state it must not leave behind, and
outages, PgBouncer's own errors among them, which never charge a record.

PostgreSQL "goes down" behind PgBouncer through a TcpProxy between the two: PgBouncer
stays up and answers its clients as it does when the server is gone.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

import anyio
import asyncpg
import pytest

from acode_sync.config import PostgresSettings
from acode_sync.domain import Session
from acode_sync.errors import PostgresUnavailableError
from acode_sync.migrations import latest_version, load_migrations
from acode_sync.postgres import DIALECT, PostgresTarget
from acode_sync.preflight import check_postgres
from acode_sync.store import WorkspaceDatabase
from acode_sync.sync import SyncSummary
from tests.bouncer import PgBouncer, database_name, pgbouncer
from tests.daemon_harness import ACODE, run_cli, write_config
from tests.faults import AtNth
from tests.integration.test_sync import clone_workspace
from tests.integration.test_sync_faults import (
    applied_key_counts,
    assert_applied_exactly_once,
    assert_untouched,
    audit_counts,
    outbox,
    pg_fetch,
    syncer,
    write_records,
)
from tests.pg import install_audit
from tests.proxy import TcpProxy
from tests.records import run_sql

pytestmark = [pytest.mark.anyio, pytest.mark.postgres, pytest.mark.processes]

POOL_SIZE: Final = 2  # PgBouncer's server connections per database: fewer than clients
RECOVERY_TRIES: Final = 10


def bounced_target(url: str, *, pool_max: int = 4, **settings: float) -> PostgresTarget:
    """A target through PgBouncer, configured as docs/postgres.md says."""
    options: dict[str, float] = {"connect_timeout": 2.0, "statement_timeout": 5.0} | settings
    return PostgresTarget(
        PostgresSettings(dsn=url, pool_max=pool_max, statement_cache_size=0, **options)  # type: ignore[arg-type]
    )


@pytest.fixture
def proxy(pg_url: str) -> Iterator[TcpProxy]:
    """Between PgBouncer and PostgreSQL."""
    parts = urlsplit(pg_url)
    with TcpProxy(upstream=(parts.hostname or "127.0.0.1", parts.port or 5432)) as running:
        yield running


@pytest.fixture
def bouncer(proxy: TcpProxy) -> Iterator[PgBouncer]:
    with pgbouncer(("127.0.0.1", proxy.port), default_pool_size=POOL_SIZE) as running:
        yield running


async def drain_through(url: str, workspace: Path) -> None:
    target = bounced_target(url)
    try:
        await syncer(workspace, target).drain()
    finally:
        await target.close()


async def drain_after_outage(
    workspace: Path, target: PostgresTarget, pending: set[int]
) -> SyncSummary:
    """Drain once PgBouncer serves again. PgBouncer finds a server connection dead only
    when a client's query fails on it, so the first tries after PostgreSQL's return may
    still fail (as outages that charge nothing, which the daemon waits out)."""
    for _ in range(RECOVERY_TRIES):
        try:
            return await syncer(workspace, target).drain()
        except PostgresUnavailableError:
            assert_untouched(workspace, pending)
            await anyio.sleep(0.5)
    raise AssertionError(f"no drain within {RECOVERY_TRIES} tries")


# -- the normal path -------------------------------------------------------------------


async def test_restores_one_after_another_through_transaction_pooling(
    tmp_path: Path, pg_url: str, bouncer: PgBouncer
) -> None:
    """Each `acode db restore` a process of its own, whose statements meet the names an
    earlier one prepared on the same server connection, unless it prepares none."""
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    write_records(shipped, 12)
    await drain_through(bouncer.url(pg_url), shipped)
    entities = len(await pg_fetch(pg_url, "SELECT session_id FROM acode.sessions")) + len(
        await pg_fetch(pg_url, "SELECT task_id FROM acode.session_tasks")
    )
    config = write_config(
        tmp_path / "acode-syncd.toml",
        {"postgres": {"dsn": bouncer.url(pg_url), "statement_cache_size": 0}},
    )
    for n in range(2 * POOL_SIZE + 1):  # more restores than server connections
        into = tmp_path / f"restored{n}"
        into.mkdir()
        WorkspaceDatabase(into).close()
        done = await anyio.to_thread.run_sync(
            partial(run_cli, ACODE, "db", "restore", "--all", "--workspace", str(into),
                    "--config", str(config))
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        counts = run_sql(
            into, "SELECT (SELECT count(*) FROM sessions) + (SELECT count(*) FROM session_tasks)"
        )
        assert counts == [(entities,)]


async def test_workspaces_ship_with_conflicts_and_duplicates_through_transaction_pooling(
    tmp_path: Path, pg_url: str, bouncer: PgBouncer
) -> None:
    url = bouncer.url(pg_url)
    workspaces = [tmp_path / f"ws{n}" for n in range(4)]
    for workspace in workspaces:
        workspace.mkdir()
    keys = [write_records(workspace, 40) for workspace in workspaces]
    # A copy of a workspace taken before it shipped (a restored backup): its records
    # come again, as duplicates.
    copy = tmp_path / "copy"
    shutil.copytree(workspaces[0], copy)
    first = bounced_target(url)
    try:
        await first.ensure_schema()
    finally:
        await first.close()
    await install_audit(pg_url)
    # Four syncers at once, each with a pool of 4, over PgBouncer's 2 server connections.
    async with anyio.create_task_group() as tg:
        for workspace in workspaces:
            tg.start_soon(drain_through, url, workspace)
    every_key = Counter(key for workspace_keys in keys for key in workspace_keys)
    assert await applied_key_counts(pg_url) == every_key
    assert await audit_counts(pg_url) == every_key  # no entity written twice
    for workspace in workspaces:
        assert {row.state for row in outbox(workspace).values()} == {"processed"}

    # One session, then two machines with its history editing it: the second to ship
    # conflicts with the first, and the later edit wins.
    base = tmp_path / "base"
    base.mkdir()
    db = WorkspaceDatabase(base)
    session = db.save(Session(title="v1"))
    db.close()
    await drain_through(url, base)
    for name in ("a", "b"):  # b saves last: its edit is the newer
        clone_workspace(base, tmp_path / name)
        db = WorkspaceDatabase(tmp_path / name)
        db.save(replace(session, title=f"from {name}"))
        db.close()
    await drain_through(url, tmp_path / "a")
    target = bounced_target(url)
    try:
        summary = await syncer(tmp_path / "b", target).drain()
        conflicts = await target.list_conflicts(session.session_id, 10)
    finally:
        await target.close()
    assert (summary.applied, summary.conflicts) == (0, 1)
    assert [c["winner"] for c in conflicts] == ["incoming"]
    title = await pg_fetch(
        pg_url, "SELECT title FROM acode.sessions WHERE session_id = $1", session.session_id
    )
    assert title[0][0] == "from b"

    target = bounced_target(url)
    try:
        resent = await syncer(copy, target).drain()
    finally:
        await target.close()
    assert (resent.applied, resent.duplicates) == (0, len(keys[0]))
    assert {row.state for row in outbox(copy).values()} == {"processed"}
    # Never more than PgBouncer's server connections on PostgreSQL.
    assert bouncer.server_connections(database_name(pg_url)) <= POOL_SIZE


# -- the central migration -------------------------------------------------------------


async def test_concurrent_cold_starts_migrate_once_and_leave_no_session_state(
    pg_url: str, bouncer: PgBouncer
) -> None:
    url = bouncer.url(pg_url)
    bouncer.reconfigure(default_pool_size=1)  # every client uses the one server connection
    results: list[tuple[int, int]] = []

    async def cold_start() -> None:
        target = bounced_target(url)
        try:
            results.append(await target.ensure_schema())
        finally:
            await target.close()

    async with anyio.create_task_group() as tg:
        for _ in range(6):
            tg.start_soon(cold_start)
    latest = latest_version(load_migrations(DIALECT))
    assert sorted(results) == [(0, latest)] + [(latest, latest)] * 5

    # What the migration and a batch set is transaction-scoped: the server connection
    # they ran on, which the next client gets, holds no setting, lock or statement.
    workspace = bouncer.dir / "ws"
    workspace.mkdir()
    write_records(workspace, 10)
    await drain_through(url, workspace)
    conn = await asyncpg.connect(url, statement_cache_size=0)
    try:
        settings = await conn.fetchrow(
            "SELECT current_setting('search_path') AS search_path,"
            " current_setting('statement_timeout') AS statement_timeout,"
            " current_setting('lock_timeout') AS lock_timeout,"
            " current_setting('plan_cache_mode') AS plan_cache_mode,"
            " current_setting('enable_seqscan') AS enable_seqscan,"
            " (SELECT count(*) FROM pg_prepared_statements) AS prepared,"
            " (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
            "  AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))"
            " AS advisory"
        )
    finally:
        await conn.close()
    assert dict(settings) == {
        "search_path": '"$user", public',
        "statement_timeout": "0",
        "lock_timeout": "0",
        "plan_cache_mode": "auto",
        "enable_seqscan": "on",
        "prepared": 0,
        "advisory": 0,
    }


# -- outages: nothing charged, everything ships after ----------------------------------


@dataclass(frozen=True)
class Scene:
    bouncer: PgBouncer
    proxy: TcpProxy  # between PgBouncer and PostgreSQL
    url: str  # the test's database, through PgBouncer


Heal = Callable[[], Awaitable[None]]


async def postgres_down(scene: Scene) -> Heal:
    """PgBouncer up, PostgreSQL gone: its clients wait for a server, then get
    `query_wait_timeout` or `server login has been failing` (08P01)."""
    scene.bouncer.reconfigure(query_wait_timeout=1)
    scene.proxy.down()

    async def heal() -> None:
        scene.proxy.restore()
        await anyio.sleep(1.5)  # PgBouncer's server_login_retry

    return heal


async def pgbouncer_down(scene: Scene) -> Heal:
    scene.bouncer.stop()

    async def heal() -> None:
        scene.bouncer.start()

    return heal


async def max_client_conn(scene: Scene) -> Heal:
    """Other clients hold every client slot: `no more connections allowed
    (max_client_conn)` (08P01) at login."""
    scene.bouncer.reconfigure(max_client_conn=2)
    others = [await asyncpg.connect(scene.url, statement_cache_size=0) for _ in range(2)]

    async def heal() -> None:
        for conn in others:
            await conn.close()

    return heal


async def query_wait_timeout(scene: Scene) -> Heal:
    """Another client holds every server connection in an open transaction."""
    scene.bouncer.reconfigure(query_wait_timeout=1)
    holders = [await asyncpg.connect(scene.url, statement_cache_size=0) for _ in range(POOL_SIZE)]
    for conn in holders:
        await conn.execute("BEGIN")
        await conn.fetchval("SELECT 1")

    async def heal() -> None:
        for conn in holders:
            await conn.close()

    return heal


async def database_disabled(scene: Scene) -> Heal:
    """An administrator's `DISABLE db`: `database "..." is disabled` (08P01) at login."""
    database = database_name(scene.url)
    scene.bouncer.admin(f"DISABLE {database}")

    async def heal() -> None:
        scene.bouncer.admin(f"ENABLE {database}")

    return heal


FAULTS: Final[dict[str, Callable[[Scene], Awaitable[Heal]]]] = {
    "postgres_down": postgres_down,
    "pgbouncer_down": pgbouncer_down,
    "max_client_conn": max_client_conn,
    "query_wait_timeout": query_wait_timeout,
    "database_disabled": database_disabled,
}


@pytest.mark.parametrize("fault", list(FAULTS))
async def test_an_outage_behind_pgbouncer_charges_nothing_and_ships_after(
    workspace: Path, pg_url: str, proxy: TcpProxy, bouncer: PgBouncer, fault: str
) -> None:
    keys = write_records(workspace, 30)
    url = bouncer.url(pg_url)
    target = bounced_target(url)
    try:
        await target.ensure_schema()
        await install_audit(pg_url)
        await target.close()  # no pooled connection survives into the fault
        heal = await FAULTS[fault](Scene(bouncer, proxy, url))
        with pytest.raises(PostgresUnavailableError) as raised:
            await syncer(workspace, target).drain()
        assert raised.value.code == "ACODE-DB-005"
        assert_untouched(workspace, set(outbox(workspace)))
        assert await applied_key_counts(pg_url) == Counter()

        await heal()
        summary = await drain_after_outage(workspace, target, set(outbox(workspace)))
    finally:
        await target.close()
    assert (summary.applied, summary.retried, summary.dead) == (len(keys), 0, 0)
    await assert_applied_exactly_once(pg_url, workspace)


async def test_a_server_connection_crash_mid_batch_rolls_back_and_charges_nothing(
    workspace: Path, pg_url: str, proxy: TcpProxy, bouncer: PgBouncer
) -> None:
    """PostgreSQL's connection dies under a batch: PgBouncer tells its client `server conn
    crashed?` and closes it."""
    write_records(workspace, 30)
    url = bouncer.url(pg_url)
    target = bounced_target(url)
    try:
        await target.ensure_schema()
        await install_audit(pg_url)
        cut_at_the_second_commit = AtNth("before_commit", 2, proxy.cut)
        with pytest.raises(PostgresUnavailableError) as raised:
            await syncer(workspace, target, fault_hook=cut_at_the_second_commit).drain()
        assert "SQLSTATE 08003" in raised.value.message
        rows = outbox(workspace)
        pending = {i for i, r in rows.items() if r.state == "pending"}
        assert_untouched(workspace, pending)
        summary = await drain_after_outage(workspace, target, pending)
    finally:
        await target.close()
    assert (summary.retried, summary.dead, summary.duplicates) == (0, 0, 0)
    await assert_applied_exactly_once(pg_url, workspace)


# -- acode-syncd check-config --connect ------------------------------------------------


async def migrated(url: str) -> None:
    target = bounced_target(url)
    try:
        await target.ensure_schema()
    finally:
        await target.close()


@pytest.mark.parametrize("cache", [100, 0])
async def test_check_connect_names_transaction_pooling_and_the_statement_cache(
    pg_url: str, bouncer: PgBouncer, cache: int
) -> None:
    url = bouncer.url(pg_url)
    await migrated(url)
    found = await check_postgres(PostgresSettings(dsn=url, statement_cache_size=cache))
    assert any("schema acode at version" in line for line in found.passed)  # checks ran
    if cache:
        assert found.problems == [
            "behind a connection pooler in transaction pooling (PgBouncer's pool_mode = "
            "transaction): a prepared statement lives on one server connection, so with "
            "postgres.statement_cache_size = 100 batches would fail with SQLSTATE 26000; "
            "set postgres.statement_cache_size = 0"
        ]
    else:
        assert found.problems == []
        assert found.passed[-1] == (
            "behind a connection pooler in transaction pooling, with "
            "postgres.statement_cache_size = 0, as it needs"
        )


async def test_check_connect_finds_no_pooler_on_postgres_and_session_pooling_ok(
    pg_url: str,
) -> None:
    await migrated(pg_url)
    direct = await check_postgres(PostgresSettings(dsn=pg_url))
    assert not direct.problems
    assert not any("pooler" in line for line in direct.passed)
    with pgbouncer(pool_mode="session", default_pool_size=POOL_SIZE) as session_pooling:
        found = await check_postgres(PostgresSettings(dsn=session_pooling.url(pg_url)))
    assert not found.problems
    assert found.passed[-1] == (
        "behind a connection pooler that keeps each client on its own server connection "
        "(session pooling): statement_cache_size = 100 works there"
    )


async def test_the_statement_cache_behind_transaction_pooling_fails_as_check_connect_says(
    workspace: Path, pg_url: str, bouncer: PgBouncer
) -> None:
    """What the check prevents, shown: several syncers with the cache on, through
    transaction pooling, meet SQLSTATE 26000, an outage that charges nothing."""
    url = bouncer.url(pg_url)
    await migrated(url)
    targets = [
        PostgresTarget(PostgresSettings(dsn=url, statement_cache_size=100)) for _ in range(3)
    ]
    errors: list[str] = []

    async def probe_often(target: PostgresTarget) -> None:
        for _ in range(20):
            try:
                await target.list_conflicts(None, 1)
            except PostgresUnavailableError as error:
                errors.append(error.message)

    try:
        async with anyio.create_task_group() as tg:
            for target in targets:
                tg.start_soon(probe_often, target)
    finally:
        for target in targets:
            await target.close()
    assert errors
    assert all("SQLSTATE 26000" in message for message in errors), errors[:3]


def test_acode_db_migrate_postgres_through_pgbouncer_then_nothing_to_do(
    tmp_path: Path, pg_url: str, bouncer: PgBouncer
) -> None:
    config = write_config(
        tmp_path / "acode-syncd.toml",
        {"postgres": {"dsn": bouncer.url(pg_url), "statement_cache_size": 0}},
    )
    latest = latest_version(load_migrations(DIALECT))
    runs = [
        run_cli(ACODE, "db", "migrate", "--postgres", "--config", str(config)) for _ in range(2)
    ]
    assert [run.returncode for run in runs] == [0, 0], [run.stderr for run in runs]
    versions = anyio.run(
        pg_fetch, pg_url, "SELECT version FROM acode.schema_migrations ORDER BY version"
    )
    assert [row[0] for row in versions] == list(range(1, latest + 1))
