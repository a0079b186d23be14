from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from acode_sync.domain import (
    Artifact,
    Entity,
    Session,
    SessionEvent,
    SessionState,
    SessionTask,
    Step,
    ToolCall,
)
from acode_sync.errors import InvalidTransitionError, RecordRejectedError
from acode_sync.store import WorkspaceDatabase, WorkspaceStore
from acode_sync.workspace import OpenOptions, database_path, migrate, open_workspace

pytestmark = pytest.mark.anyio


def outbox_rows(workspace: Path) -> list[sqlite3.Row]:
    conn = sqlite3.connect(database_path(workspace))
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute("SELECT * FROM outbox ORDER BY outbox_id").fetchall()
    finally:
        conn.close()


class FrozenClock:
    """A clock that stands still unless moved: several saves land in one tick."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


async def test_save_and_get_every_entity(store: WorkspaceStore, workspace: Path) -> None:
    session = await store.save(Session(title="fix the build", metadata={"repo": "x", "n": [1, 2]}))
    task = await store.save(SessionTask(session_id=session.session_id, title="run tests"))
    step = await store.save(Step(session_id=session.session_id, task_id=task.task_id))
    call = await store.save(
        ToolCall(
            session_id=session.session_id,
            step_id=step.step_id,
            name="bash",
            arguments={"cmd": "make test"},
            result={"exit": 0},
        )
    )
    artifact = await store.save(
        Artifact(session_id=session.session_id, type="diff", content="+ok\n", name="patch")
    )
    event = await store.append_event(session.session_id, "started", {"by": "agent"})

    saved: list[Entity] = [session, task, step, call, artifact, event]
    for entity in saved:
        assert entity.created_at is not None
        assert entity.created_at == entity.updated_at
        assert await store.get(type(entity), entity.entity_id) == entity

    rows = outbox_rows(workspace)
    assert [(r["entity_type"], r["entity_id"]) for r in rows] == [
        (e.entity_type, e.entity_id) for e in saved
    ]
    for row, entity in zip(rows, saved, strict=True):
        assert (
            row["idempotency_key"] == f"{entity.entity_type}:{entity.entity_id}:{entity.updated_at}"
        )
        assert json.loads(row["payload"]) == entity.row()
        assert row["session_id"] == session.session_id
        assert row["base_updated_at"] is None
        assert (row["state"], row["attempts"], row["processed_at"]) == ("pending", 0, None)


async def test_get_missing_returns_none(store: WorkspaceStore) -> None:
    assert await store.get(Session, "sess_missing") is None


async def test_updates_carry_the_version_they_were_based_on(
    store: WorkspaceStore, workspace: Path
) -> None:
    first = await store.save(Session(title="a"))
    second = await store.save(
        Session(session_id=first.session_id, state=SessionState.PLANNING, title="b")
    )
    assert second.created_at == first.created_at
    assert second.updated_at is not None
    assert first.updated_at is not None
    assert second.updated_at > first.updated_at
    rows = outbox_rows(workspace)
    assert [r["base_updated_at"] for r in rows] == [None, first.updated_at]
    assert rows[0]["outbox_id"] < rows[1]["outbox_id"]


async def test_saves_in_one_clock_tick_get_distinct_keys(workspace: Path) -> None:
    clock = FrozenClock(datetime(2026, 1, 15, 10, 30, tzinfo=UTC))
    async with await WorkspaceStore.open(workspace, OpenOptions(clock=clock)) as store:
        session = await store.save(Session())
        versions = [str(session.updated_at)]
        for title in ("a", "b", "c"):
            session = await store.save(Session(session_id=session.session_id, title=title))
            versions.append(str(session.updated_at))
        clock.now -= timedelta(hours=1)  # a clock stepping back does not reorder versions
        session = await store.save(Session(session_id=session.session_id, title="d"))
        versions.append(str(session.updated_at))
    assert versions == sorted(versions)
    assert len(set(versions)) == 5
    keys = [r["idempotency_key"] for r in outbox_rows(workspace)]
    assert len(set(keys)) == 5


async def test_illegal_transition_writes_nothing(store: WorkspaceStore, workspace: Path) -> None:
    session = await store.save(Session())
    await store.save(Session(session_id=session.session_id, state=SessionState.CANCELLED))
    with pytest.raises(InvalidTransitionError):
        await store.save(Session(session_id=session.session_id, state=SessionState.EXECUTING))
    with pytest.raises(InvalidTransitionError):
        await store.save(Session(state=SessionState.PLANNING))
    stored = await store.get(Session, session.session_id)
    assert stored is not None
    assert stored.state is SessionState.CANCELLED
    assert len(outbox_rows(workspace)) == 2


async def test_invalid_json_values_are_rejected(store: WorkspaceStore, workspace: Path) -> None:
    with pytest.raises(RecordRejectedError, match="JSON"):
        await store.save(Session(metadata={"x": float("nan")}))
    with pytest.raises(RecordRejectedError, match="JSON"):
        await store.save(Session(metadata={"x": object()}))
    assert outbox_rows(workspace) == []


async def test_given_created_at_is_kept_on_insert(store: WorkspaceStore) -> None:
    session = await store.save(Session(created_at="2025-06-01T12:00:00+02:00"))
    assert session.created_at == "2025-06-01T10:00:00.000000Z"


async def test_keyset_pages_walk_every_session_once(workspace: Path) -> None:
    clock = FrozenClock(datetime(2026, 1, 1, tzinfo=UTC))
    async with await WorkspaceStore.open(workspace, OpenOptions(clock=clock)) as store:
        ids = []
        for n in range(23):
            clock.now += timedelta(seconds=1)
            state = SessionState.CREATED if n % 2 else SessionState.PLANNING
            created = await store.save(Session())
            if state is SessionState.PLANNING:
                created = await store.save(Session(session_id=created.session_id, state=state))
            ids.append(created.session_id)

        seen: list[str] = []
        cursor = None
        while True:
            page = await store.list_sessions(limit=5, cursor=cursor)
            seen.extend(s.session_id for s in page.items)
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        assert seen == list(reversed(ids))

        planning = await store.list_sessions(state=SessionState.PLANNING, limit=100)
        assert [s.session_id for s in planning.items] == list(reversed(ids[0::2]))
        assert planning.next_cursor is None

        recent = await store.list_sessions(updated_since="2026-01-01T00:00:20Z", limit=100)
        assert [s.session_id for s in recent.items] == list(reversed(ids[19:]))


async def test_bad_page_arguments_are_rejected(store: WorkspaceStore) -> None:
    with pytest.raises(RecordRejectedError, match="cursor"):
        await store.list_sessions(cursor="not-a-cursor!")
    with pytest.raises(RecordRejectedError, match="limit"):
        await store.list_sessions(limit=0)
    with pytest.raises(RecordRejectedError, match="RFC 3339"):
        await store.list_sessions(updated_since="last week")


async def test_events_list_in_append_order(store: WorkspaceStore) -> None:
    session = await store.save(Session())
    events = [await store.append_event(session.session_id, f"e{n}") for n in range(5)]
    assert await store.list_events(session.session_id) == events
    assert await store.list_events(session.session_id, after=events[2].event_id) == events[3:]
    assert isinstance(events[0], SessionEvent)


def test_origin_id_is_a_uuid_kept_across_opens(workspace: Path) -> None:
    first = WorkspaceDatabase(workspace)
    first.close()
    second = WorkspaceDatabase(workspace)
    second.close()
    assert first.origin_id == second.origin_id
    assert len(first.origin_id) == 36


def test_two_workspaces_get_different_origins(tmp_path: Path) -> None:
    origins = set()
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        db = WorkspaceDatabase(tmp_path / name)
        origins.add(db.origin_id)
        db.close()
    assert len(origins) == 2


@pytest.fixture
def raw(workspace: Path) -> Iterator[sqlite3.Connection]:
    conn = open_workspace(workspace)
    yield conn
    conn.close()


def test_migrations_run_once_and_are_recorded(raw: sqlite3.Connection) -> None:
    rows = raw.execute(
        "SELECT version, name, checksum, created_at FROM schema_migrations"
    ).fetchall()
    assert [(v, n) for v, n, _, _ in rows] == [
        (1, "initial"),
        (2, "outbox_sync_state"),
        (3, "progress_mark"),
        (4, "consistent_outbox"),
        (5, "entity_extra"),
        (6, "fixed_sessions"),
        (7, "outbox_jsonb_digest"),
    ]
    schema_before = raw.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall()
    assert migrate(raw) == (7, 7)
    assert raw.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall() == schema_before
    assert raw.execute("SELECT count(*) FROM schema_migrations").fetchone() == (7,)


def test_every_table_is_strict_with_created_and_updated_at(raw: sqlite3.Connection) -> None:
    tables = [
        name
        for (name,) in raw.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )
    ]
    assert set(tables) >= {
        "sessions",
        "session_events",
        "session_tasks",
        "steps",
        "tool_calls",
        "artifacts",
        "outbox_records",
        "outbox_sync",
        "outbox_progress",
        "outbox_errors",
        "schema_migrations",
    }
    # `outbox` is a view over the outbox tables: a view is not STRICT.
    assert raw.execute("SELECT type FROM sqlite_master WHERE name = 'outbox'").fetchone() == (
        "view",
    )
    for table in tables:
        strict = raw.execute("SELECT strict FROM pragma_table_list WHERE name = ?", (table,))
        assert strict.fetchone() == (1,), table
        columns = {row[1]: row for row in raw.execute(f"PRAGMA table_info({table})")}
        assert columns["created_at"][3] == 1, f"{table}.created_at must be NOT NULL"
        assert "updated_at" in columns, table


def test_acceptance_columns_exist(raw: sqlite3.Connection) -> None:
    required = {
        "sessions": {"session_id", "state", "created_at", "updated_at"},
        "session_events": {"event_id", "session_id", "event_type", "payload"},
        "session_tasks": {"task_id", "session_id", "status", "created_at"},
        "steps": {"step_id", "task_id", "status"},
        "tool_calls": {"tool_call_id", "step_id", "name", "arguments", "result"},
        "artifacts": {"artifact_id", "session_id", "content", "type"},
        "outbox": {
            "outbox_id",
            "idempotency_key",
            "entity_type",
            "entity_id",
            "session_id",
            "payload",
            "created_at",
            "processed_at",
            "attempts",
            "base_updated_at",
            "next_attempt_at",
            "last_error",
            "state",
        },
    }
    for table, columns in required.items():
        found = {row[1] for row in raw.execute(f"PRAGMA table_info({table})")}
        assert columns <= found, (table, columns - found)
    key_index = raw.execute(
        "SELECT 1 FROM pragma_index_list('outbox_records') WHERE [unique] = 1 AND origin = 'u'"
    ).fetchone()
    assert key_index is not None, "idempotency_key must be UNIQUE"


def test_outbox_ids_are_never_reused(raw: sqlite3.Connection) -> None:
    insert = (
        "INSERT INTO outbox (idempotency_key, entity_type, entity_id, payload, created_at) "
        "VALUES (?, 'Session', 'sess_1', '{}', '2026-01-01T00:00:00.000000Z')"
    )
    raw.execute(insert, ("k1",))
    raw.execute(insert, ("k2",))
    raw.execute("DELETE FROM outbox")
    raw.execute(insert, ("k3",))
    assert raw.execute("SELECT outbox_id FROM outbox").fetchone() == (3,)
