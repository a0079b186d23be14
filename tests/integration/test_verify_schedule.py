"""The verify scheduler in-process, against the real PostgreSQL and real workspace files:
its outcomes in the metrics, a workspace that cannot be verified, one removed, a verify
still running at its next slot, and verifying turned off by a new configuration."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import anyio
import pytest
from prometheus_client import generate_latest

from acode_sync.config import Config, DaemonSettings, PostgresSettings, SyncSettings
from acode_sync.domain import Session
from acode_sync.metrics import Metrics
from acode_sync.postgres import PostgresTarget
from acode_sync.store import WorkspaceDatabase
from acode_sync.sync import WorkspaceSyncer
from acode_sync.verify_schedule import VerifyScheduler
from acode_sync.worker import Heartbeat, Shared
from tests.daemon_harness import sample

pytestmark = [pytest.mark.postgres, pytest.mark.anyio]

FAST = DaemonSettings(verify_interval_hours=0.0001)  # a slot every 0.36 s


@pytest.fixture
async def shared(pg_url: str) -> AsyncIterator[Shared]:
    postgres = PostgresSettings(dsn=pg_url, pool_max=2)
    target = PostgresTarget(postgres)
    try:
        yield Shared(
            config=Config(postgres=postgres, daemon=FAST),
            target=target,
            metrics=Metrics(),
            limiter=anyio.CapacityLimiter(1),
            on_postgres=lambda up, refused: None,
            watchdog=Heartbeat(),
        )
    finally:
        await target.close()


def exposed(shared: Shared, name: str, **labels: str) -> float | None:
    return sample(generate_latest(shared.metrics.registry).decode(), name, **labels)


async def until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(300):  # 15 s
        if condition():
            return
        await anyio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def test_outcomes_removal_and_turning_it_off(tmp_path: Path, shared: Shared) -> None:
    good, gone = tmp_path / "good", tmp_path / "gone"
    good.mkdir()
    db = WorkspaceDatabase(good)
    db.save(Session(title="verified"))
    db.close()
    await WorkspaceSyncer(workspace=good, target=shared.target, settings=SyncSettings()).drain(
        lock_wait=10
    )
    watched = {good: None, gone: None}  # `gone` has no database: every verify fails
    state = {"shared": shared}
    scheduler = VerifyScheduler(workspaces=watched.keys, shared=lambda: state["shared"])

    async with anyio.create_task_group() as tg:
        tg.start_soon(scheduler.run)
        await until(
            lambda: (exposed(shared, "acode_sync_verify_runs_total", result="ok") or 0) >= 2, "ok"
        )
        await until(
            lambda: (exposed(shared, "acode_sync_verify_runs_total", result="error") or 0) >= 2,
            "error",
        )
        assert (
            exposed(shared, "acode_sync_verify_mismatches", workspace=str(good), kind="missing")
            == 0
        )
        assert (
            exposed(shared, "acode_sync_verify_last_success_timestamp_seconds", workspace=str(gone))
            is None
        )
        assert exposed(shared, "acode_sync_verify_interval_seconds") == pytest.approx(0.36)

        # Removed: its series go, and it is verified no more.
        del watched[good]
        scheduler.wake()
        await until(
            lambda: (
                exposed(
                    shared, "acode_sync_verify_last_success_timestamp_seconds", workspace=str(good)
                )
                is None
            ),
            "the removed workspace's series gone",
        )
        assert (
            exposed(shared, "acode_sync_verify_mismatches", workspace=str(good), kind="stale")
            is None
        )

        # Turned off by a new configuration.
        state["shared"] = replace(
            shared, config=replace(shared.config, daemon=DaemonSettings(verify_interval_hours=0))
        )
        scheduler.wake()
        await until(lambda: exposed(shared, "acode_sync_verify_interval_seconds") == 0, "off")
        errors = exposed(shared, "acode_sync_verify_runs_total", result="error")
        await anyio.sleep(1.0)
        assert exposed(shared, "acode_sync_verify_runs_total", result="error") == errors
        tg.cancel_scope.cancel()


async def test_a_verify_still_running_skips_its_next_slot(tmp_path: Path, shared: Shared) -> None:
    """The limiter's only token is held elsewhere: the first verify waits for it across
    many slots, and no second one piles up behind it."""
    workspace = tmp_path / "w"
    workspace.mkdir()
    WorkspaceDatabase(workspace).close()
    scheduler = VerifyScheduler(workspaces=lambda: [workspace], shared=lambda: shared)
    async with anyio.create_task_group() as tg:
        await shared.limiter.acquire()
        tg.start_soon(scheduler.run)
        await anyio.sleep(1.5)  # about four slots
        assert shared.limiter.statistics().tasks_waiting == 1
        shared.limiter.release()
        await until(
            lambda: (exposed(shared, "acode_sync_verify_runs_total", result="ok") or 0) >= 1, "ok"
        )
        tg.cancel_scope.cancel()
