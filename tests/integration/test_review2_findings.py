"""Holes found in this round's restore, verify and tenant features.

Each test showed one hole on the real SQLite files and the real PostgreSQL with real
roles: it failed on the code before its fix."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from acode_sync.config import PostgresSettings
from acode_sync.domain import Session, SessionTask
from acode_sync.postgres import PostgresTarget
from acode_sync.restore import RestoreRequest, Selection, restore
from acode_sync.roles import grant_syncer, set_tenants
from acode_sync.store import WorkspaceStore, encode_json
from acode_sync.verify import Kind, Verifier
from acode_sync.workspace import database_path
from tests.integration.test_guarantees import admin
from tests.integration.test_restore import settings, ship, write_plain
from tests.integration.test_roles import NewRole, drain, new_role, owner, save
from tests.records import enqueue_raw, run_sql

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]
__all__ = ["new_role", "owner", "settings"]  # fixtures, used by name

STAMP = "2026-01-15T10:30:00.000001Z"


def vendor_event(session_id: str) -> str:
    """An event's payload exactly as the store spells it (encode_json, the fields in
    order, then the unknown key): only the unknown key sets it apart."""
    row: dict[str, str | None] = {"session_id": session_id, "created_at": STAMP}
    row |= {"updated_at": STAMP}
    row |= {"event_id": "evt_vendor", "event_type": "vendor", "payload": None}
    return encode_json(row | {"vendor_tag": "keep me"})


async def restored_with_unknown_key(
    store: WorkspaceStore, settings: PostgresSettings, tmp_path: Path
) -> Path:
    """A session and an event with a key this program does not know, shipped from one
    workspace and restored into a new one (disaster recovery of a lost machine)."""
    session = await store.save(Session(title="vendor run"))
    source = store.path.parent.parent
    write_plain(source, "evt_vendor", session.session_id, vendor_event(session.session_id))
    await ship(source, settings)
    restored = tmp_path / "restored"
    restored.mkdir()
    await restore(settings, RestoreRequest(restored, Selection(session_ids=(session.session_id,))))
    ((extra,),) = run_sql(
        restored, "SELECT extra FROM session_events WHERE event_id = 'evt_vendor'"
    )
    assert json.loads(extra) == {"vendor_tag": "keep me"}
    return restored


async def verify(workspace: Path, settings: PostgresSettings, *, repair: bool = False) -> Any:
    target = PostgresTarget(settings)
    try:
        return await Verifier(workspace=workspace, target=target).run(repair=repair)
    finally:
        await target.close()


async def test_a_restored_row_with_an_unknown_key_verifies_equal(
    store: WorkspaceStore, settings: PostgresSettings, tmp_path: Path
) -> None:
    restored = await restored_with_unknown_key(store, settings, tmp_path)

    report = await verify(restored, settings)

    assert [d.kind for d in report.differences] == []
    assert report.ok


async def test_repair_ships_a_rows_unknown_keys_again(
    store: WorkspaceStore, settings: PostgresSettings, tmp_path: Path
) -> None:
    restored = await restored_with_unknown_key(store, settings, tmp_path)
    # The central database loses the row (restored from an older backup, a delete by hand).
    dsn = settings.connect_dsn()
    await admin(dsn, "DELETE FROM acode.session_events WHERE event_id = 'evt_vendor'")

    report = await verify(restored, settings, repair=True)
    assert [d.kind for d in report.problems] == [Kind.MISSING]
    await ship(restored, settings)

    (row,) = await admin(
        dsn, "SELECT extra FROM acode.session_events WHERE event_id = 'evt_vendor'"
    )
    assert json.loads(row["extra"]) == {"vendor_tag": "keep me"}


def queue_orphan_step(workspace: Path, step_id: str, task_id: str) -> None:
    """A hostile writer's plain INSERT of a step under `task_id`, naming no session."""
    payload = {
        "step_id": step_id,
        "task_id": task_id,
        "session_id": None,
        "status": "running",
        "description": "injected",
        "created_at": STAMP,
        "updated_at": STAMP,
    }
    conn = sqlite3.connect(database_path(workspace), isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        enqueue_raw(
            conn, f"Step:{step_id}:{STAMP}", "Step", step_id, None, json.dumps(payload), STAMP
        )
        conn.execute("COMMIT")
    finally:
        conn.close()


async def test_a_hostile_tenant_puts_no_step_under_another_tenants_task(
    pg_url: str, owner: PostgresTarget, new_role: NewRole, tmp_path: Path
) -> None:
    (role_a, dsn_a), (role_b, dsn_b) = await new_role(), await new_role()
    await owner.ensure_schema()
    for role in (role_a, role_b):
        await grant_syncer(owner, role)
    await set_tenants(owner, enabled=True)
    ours, hostile = tmp_path / "a", tmp_path / "b"
    session = Session(title="A's own")
    task = SessionTask(session_id=session.session_id, title="A's task")
    save(ours, session, task)
    assert (await drain(ours, dsn_a)).applied == 2
    save(hostile, Session(title="B's own"))  # B's workspace exists and ships normally

    queue_orphan_step(hostile, "step_injected", task.task_id)
    await drain(hostile, dsn_b, max_attempts=1, retry_base_seconds=0.0, retry_cap_seconds=0.0)

    children = await admin(
        pg_url, "SELECT step_id, tenant FROM acode.steps WHERE task_id = $1", task.task_id
    )
    assert [tuple(r) for r in children] == []  # docs/postgres.md: "no child row appears in it"
    assert run_sql(hostile, "SELECT state FROM outbox WHERE entity_id = 'step_injected'") == [
        ("dead",)
    ]
