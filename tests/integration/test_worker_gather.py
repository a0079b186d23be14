"""The daemon's worker gathers an interactive agent's saves into one batch
([daemon] gather_seconds) and keeps its workspace connection between an agent's close
writes: the daemon's own WorkspaceWorker on a real workspace, a real store writing into
it and a real PostgreSQL. Each wait is bounded far below the gather
time of the test that must not wait for it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final

import anyio
import pytest

from acode_sync import config as config_module
from acode_sync import worker as worker_module
from acode_sync.config import Config, DaemonSettings, PostgresSettings, SyncSettings
from acode_sync.domain import Session
from acode_sync.metrics import Metrics
from acode_sync.postgres import PostgresTarget
from acode_sync.store import WorkspaceStore
from acode_sync.worker import Heartbeat, Shared, WorkspaceWorker
from tests.integration.test_sync import fetch

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

LONG_GATHER: Final = 600.0  # beyond every wait below: a test that ships did not gather
WAIT: Final = 60.0


def shared_for(
    url: str,
    *,
    gather: float | None,
    batch_max_records: int = 1000,
    statement_cache_size: int = 100,
) -> Shared:
    config = Config(
        postgres=PostgresSettings(
            dsn=url,
            connect_timeout=5.0,
            statement_timeout=10.0,
            statement_cache_size=statement_cache_size,
        ),
        sync=SyncSettings(batch_max_records=batch_max_records),
        daemon=dataclasses.replace(DaemonSettings(), gather_seconds=gather),
    )
    return Shared(
        config=config,
        target=PostgresTarget(config.postgres),
        metrics=Metrics(),
        limiter=anyio.CapacityLimiter(1),
        on_postgres=lambda up, refused: None,
        watchdog=Heartbeat(),
    )


def batches(shared: Shared) -> int:
    count = shared.metrics.registry.get_sample_value("acode_sync_batch_duration_seconds_count")
    return int(count or 0)


async def wait_for(condition: Callable[[], bool], what: str) -> None:
    with anyio.fail_after(WAIT):
        while not condition():  # noqa: ASYNC110 - the worker has no event for it
            await anyio.sleep(0.02)


async def sessions_in_postgres(url: str) -> int:
    return int((await fetch(url, "SELECT count(*) FROM acode.sessions"))[0][0])


@asynccontextmanager
async def running(workspace: Path, shared: Shared) -> AsyncIterator[WorkspaceWorker]:
    """The worker, past its first turn (which ships what is pending without gathering);
    stopped and its pool closed afterwards."""
    worker = WorkspaceWorker(workspace, shared)
    await shared.target.ensure_schema()  # so that the counts below can read its tables
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            await wait_for(lambda: worker.syncer.summary.drained, "the first turn")
            yield worker
            worker.stop()
    finally:
        await shared.target.close()


async def save(store: WorkspaceStore, worker: WorkspaceWorker, count: int) -> None:
    for n in range(count):
        await store.save(Session(title=f"gathered {n}"))
        worker.notify_change()  # as the daemon's watcher does on the commit


@pytest.mark.parametrize("how", ["set", "unset, behind a pooler"])
async def test_saves_made_while_gathering_ship_as_one_batch(
    workspace: Path, store: WorkspaceStore, pg_url: str, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if how == "set":
        shared = shared_for(pg_url, gather=LONG_GATHER)
    else:  # the default without a statement cache, as behind a transaction pooler
        monkeypatch.setattr(config_module, "POOLED_GATHER_SECONDS", LONG_GATHER)
        shared = shared_for(pg_url, gather=None, statement_cache_size=0)
    async with running(workspace, shared) as worker:
        await save(store, worker, 1)
        # The worker read that there is work (its backlog shows it) and now gathers.
        await wait_for(lambda: worker.backlog == 1, "the worker found the first save")
        await save(store, worker, 4)
        await anyio.sleep(0.5)  # time for a worker that does not gather to ship
        assert await sessions_in_postgres(pg_url) == 0
        assert batches(shared) == 0

        worker.sync_now()  # ends the gather, as SIGUSR1 does
        await wait_for(lambda: worker.backlog == 0 and batches(shared) == 1, "one batch")
        assert await sessions_in_postgres(pg_url) == 5
        assert batches(shared) == 1


@pytest.mark.parametrize(
    ("gather", "batch_max_records", "saves"),
    [(0.0, 1000, 1), (None, 1000, 1), (LONG_GATHER, 3, 3)],
    ids=["gather off", "unset, direct", "a full batch pending"],
)
async def test_no_gather_when_off_direct_or_a_full_batch_is_pending(
    workspace: Path,
    store: WorkspaceStore,
    pg_url: str,
    gather: float | None,
    batch_max_records: int,
    saves: int,
) -> None:
    shared = shared_for(pg_url, gather=gather, batch_max_records=batch_max_records)
    async with running(workspace, shared) as worker:
        for n in range(saves):
            await store.save(Session(title=f"pending {n}"))
        worker.notify_change()  # one wake-up for all of them
        await wait_for(lambda: batches(shared) == 1 and worker.backlog == 0, "shipped")
        assert await sessions_in_postgres(pg_url) == saves


async def test_stop_ends_a_gather_and_leaves_the_records_pending(
    workspace: Path, store: WorkspaceStore, pg_url: str
) -> None:
    shared = shared_for(pg_url, gather=LONG_GATHER)
    with anyio.fail_after(WAIT):  # the worker ends long before the gather would
        async with running(workspace, shared) as worker:
            await save(store, worker, 2)
            await wait_for(lambda: worker.backlog >= 1, "the worker found the saves")
    assert worker.is_stopping()
    assert await sessions_in_postgres(pg_url) == 0
    # Nothing is lost: a worker started again ships both.
    shared = shared_for(pg_url, gather=LONG_GATHER)
    async with running(workspace, shared) as worker:
        await wait_for(lambda: batches(shared) == 1 and worker.backlog == 0, "shipped")
    assert await sessions_in_postgres(pg_url) == 2


async def test_the_workspace_connection_is_kept_between_close_writes_then_closed(
    workspace: Path, store: WorkspaceStore, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = shared_for(pg_url, gather=0.0)
    async with running(workspace, shared) as worker:
        # Idle after its first turn: a moment later nothing of the workspace is open.
        await wait_for(lambda: not worker.syncer.is_open, "the connection closed")

        monkeypatch.setattr(worker_module, "IDLE_RELEASE_SECONDS", LONG_GATHER)
        await save(store, worker, 1)
        await wait_for(lambda: batches(shared) == 1 and worker.backlog == 0, "shipped")
        kept = worker.syncer.connection
        assert kept is not None
        await save(store, worker, 1)  # the agent's next save, within the moment
        await wait_for(lambda: batches(shared) == 2 and worker.backlog == 0, "shipped again")
        assert worker.syncer.connection is kept
        assert await sessions_in_postgres(pg_url) == 2
