"""A syncer that kills itself: the child process of the crash tests (X-005).

    python -m tests.integration.sync_child WORKSPACE DSN POINT NTH BATCH_RECORDS

drains WORKSPACE into DSN and sends itself SIGKILL the NTH time the engine reaches the
fault point POINT ("before_commit", "after_commit" or "after_mark"). No cleanup runs:
no `finally`, no COMMIT or ROLLBACK sent, no SQLite mark, exactly like a power cut of
this process. Exits with NOT_REACHED if the drain ends before the point is reached.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import anyio

from acode_sync.config import PostgresSettings, SyncSettings
from acode_sync.postgres import FaultHook, PostgresTarget
from acode_sync.sync import WorkspaceSyncer
from tests.faults import AtNth

NOT_REACHED: Final = 3


def kill_at(point: str, nth: int) -> FaultHook:
    """A fault hook that SIGKILLs this process the `nth` time `point` is reached."""
    return AtNth(point, nth, lambda: os.kill(os.getpid(), signal.SIGKILL))


async def drain(workspace: Path, dsn: str, point: str, nth: int, batch_records: int) -> None:
    target = PostgresTarget(PostgresSettings(dsn=dsn, connect_timeout=5, statement_timeout=10))
    try:
        syncer = WorkspaceSyncer(
            workspace=workspace,
            target=target,
            settings=SyncSettings(batch_max_records=batch_records),
            fault_hook=kill_at(point, nth),
        )
        await syncer.drain()
    finally:
        await target.close()


def main(argv: Sequence[str]) -> int:
    workspace, dsn, point, nth, batch_records = argv
    anyio.run(drain, Path(workspace), dsn, point, int(nth), int(batch_records))
    return NOT_REACHED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
