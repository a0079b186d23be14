"""SIGTERM while a batch's opening waits for its session lock (another daemon's batch of
the same session holds it): the real daemon, a real PostgreSQL. The batch's transaction
must be ended by the daemon itself, never left to asyncpg's pool reset, which reports
"Resetting connection with an active transaction" on standard error."""

from __future__ import annotations

import time

import anyio
import asyncpg
import pytest

from acode_sync.domain import Session
from acode_sync.postgres import LOCK_NAMESPACE, lock_key
from acode_sync.store import WorkspaceDatabase
from tests.e2e.test_daemon import Rig, rig

pytestmark = [pytest.mark.postgres, pytest.mark.processes]
__all__ = ["rig"]  # a fixture, used by name


def test_sigterm_while_the_opening_waits_for_its_lock_leaves_no_transaction_to_the_pool(
    rig: Rig,
) -> None:
    workspace = rig.root / "ws"
    workspace.mkdir()
    db = WorkspaceDatabase(workspace)
    saved = db.save(Session(title="held"))
    db.close()

    async def hold_then_stop() -> str:
        conn = await asyncpg.connect(rig.pg_url)
        try:
            holding = conn.transaction()
            await holding.start()
            await conn.execute(
                "SELECT pg_advisory_xact_lock($1, $2)", LOCK_NAMESPACE, lock_key(saved.session_id)
            )
            daemon, _ = rig.start_ready(
                rig.config(
                    postgres={"statement_timeout": 20.0},
                    daemon={"drain_timeout_seconds": 0.5},
                )
            )
            deadline = time.monotonic() + 15
            waiting = 0
            while waiting == 0 and time.monotonic() < deadline:
                waiting = await conn.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                )
                await anyio.sleep(0.05)
            assert waiting == 1, "the daemon's batch never waited for the lock"
            rig.stop(daemon)
            await holding.rollback()
            return daemon.stderr()
        finally:
            await conn.close()

    stderr = anyio.run(hold_then_stop)
    assert "active transaction" not in stderr, stderr[-2000:]
