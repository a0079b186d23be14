"""The workspace store: the agent's API to save and read its run state.

Every save writes the entity row and one outbox record in the same transaction (AC-005).
Each public coroutine makes exactly one thread hop: the whole operation, all its
statements, runs as one function on the connection in a worker thread.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Generic, ParamSpec, Self, TypeVar

import anyio
import anyio.to_thread

from acode_sync import workspace
from acode_sync.domain import (
    E,
    Entity,
    Session,
    SessionEvent,
    SessionState,
    canonical_timestamp,
    check_transition,
    format_timestamp,
    idempotency_key,
    next_version,
    stamped,
    validate_entity,
)
from acode_sync.errors import RecordRejectedError
from acode_sync.jsonb import payload_digest_as_jsonb
from acode_sync.sql import queries
from acode_sync.workspace import OpenOptions, database_path, translated, write_transaction

DEFAULT_PAGE_SIZE: Final = 50
MAX_PAGE_SIZE: Final = 1000
# A payload's jsonb text is spelled at the save up to this size (0.26 ms here for one of
# a long string, more with many keys: under the workspace's write lock); a larger one's
# is left to the syncer.
STORE_DIGEST_MAX_BYTES: Final = 64 * 1024
_END_OF_TIME: Final = "9999-12-31T23:59:59.999999Z~"  # sorts after every canonical timestamp
_Q = queries("sqlite")


def encode_json(value: Any) -> str:
    """Compact, strict JSON (no NaN/Infinity, which PostgreSQL's jsonb refuses)."""
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as error:
        raise RecordRejectedError(f"value is not JSON-serialisable: {error}") from None


def outbox_row(
    key: str,
    entity_type: str,
    entity_id: str,
    session_id: str | None,
    payload: str,
    base_updated_at: str | None,
    created_at: str,
) -> tuple[Any, ...]:
    """The values of `insert_outbox`: the record, and its payload's digests (migration
    0007): None for a payload whose jsonb text cannot be spelled with certainty, or too
    large to spell while the save holds the write lock; the syncer computes it then."""
    return (key, entity_type, entity_id, session_id, payload, base_updated_at, created_at,
            payload_digests(payload.encode()))  # fmt: skip


def payload_digests(payload: bytes) -> bytes | None:
    """The SHA-256 of the payload, then of its jsonb text."""
    if len(payload) > STORE_DIGEST_MAX_BYTES:
        return None
    canonical = payload_digest_as_jsonb(payload)
    return None if canonical is None else hashlib.sha256(payload).digest() + canonical


def _to_columns(entity: Entity) -> dict[str, Any]:
    row = entity.row()
    for column in entity.json_columns:
        if row[column] is not None:
            row[column] = encode_json(row[column])
    return row


def _from_row(cls: type[E], cursor: sqlite3.Cursor, values: tuple[Any, ...]) -> E:
    row = {desc[0]: value for desc, value in zip(cursor.description, values, strict=True)}
    for column in cls.json_columns:
        if row[column] is not None:
            row[column] = json.loads(row[column])
    if cls is Session:
        row["state"] = SessionState(row["state"])
    return cls(**row)


def _payload(entity: Entity, extra: str | None) -> dict[str, Any]:
    """The outbox payload: the row, then the unknown keys the row keeps (a restore wrote
    them) so that a new version does not drop them centrally."""
    row = entity.row()
    if extra is None:
        return row
    return row | {key: value for key, value in json.loads(extra).items() if key not in row}


@dataclass(frozen=True, slots=True)
class Page(Generic[E]):
    items: tuple[E, ...]
    next_cursor: str | None


def _encode_cursor(updated_at: str, entity_id: str) -> str:
    return base64.urlsafe_b64encode(f"{updated_at}|{entity_id}".encode()).decode()


def _decode_cursor(cursor: str) -> tuple[str, str]:
    try:
        updated_at, entity_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|", 1)
    except (ValueError, binascii.Error, UnicodeError):
        raise RecordRejectedError("the page cursor is not one this store issued") from None
    return updated_at, entity_id


class WorkspaceDatabase:
    """The synchronous store on one connection. Not thread-safe: callers serialise."""

    def __init__(self, workspace_dir: Path, options: OpenOptions | None = None) -> None:
        self.options = options or OpenOptions()
        self.path = database_path(workspace_dir)
        self.conn = workspace.open_workspace(workspace_dir, self.options)
        self.origin_id = translated(self.path, workspace.origin_id, self.conn)

    def close(self) -> None:
        self.conn.close()

    def save(self, entity: E) -> E:
        return translated(self.path, self._save, entity)

    def _save(self, entity: E) -> E:
        validate_entity(entity)
        table = entity.table
        with write_transaction(self.conn):
            now = self.options.clock()
            found = self.conn.execute(_Q[f"version_{table}"], (entity.entity_id,)).fetchone()
            previous_created, previous_updated, previous_state, extra = found or (None,) * 4
            if isinstance(entity, Session):
                check_transition(
                    None if previous_state is None else SessionState(previous_state),
                    entity.state,
                )
            updated_at = next_version(now, previous_updated)
            created_at = previous_created or (
                canonical_timestamp(entity.created_at) if entity.created_at else updated_at
            )
            saved = stamped(entity, created_at=created_at, updated_at=updated_at)
            self.conn.execute(_Q[f"save_{table}"], _to_columns(saved))
            self.conn.execute(
                _Q["insert_outbox"],
                outbox_row(
                    idempotency_key(saved.entity_type, saved.entity_id, updated_at),
                    saved.entity_type,
                    saved.entity_id,
                    saved.session_id,
                    encode_json(_payload(saved, extra)),
                    previous_updated,
                    format_timestamp(now),
                ),
            )
        return saved

    def get(self, cls: type[E], entity_id: str) -> E | None:
        def _get() -> E | None:
            cursor = self.conn.execute(_Q[f"get_{cls.table}"], (entity_id,))
            values = cursor.fetchone()
            return None if values is None else _from_row(cls, cursor, values)

        return translated(self.path, _get)

    def list_sessions(
        self,
        *,
        state: SessionState | None = None,
        updated_since: str | None = None,
        limit: int = DEFAULT_PAGE_SIZE,
        cursor: str | None = None,
    ) -> Page[Session]:
        if not 1 <= limit <= MAX_PAGE_SIZE:
            raise RecordRejectedError(f"limit must be between 1 and {MAX_PAGE_SIZE}")
        before = _decode_cursor(cursor) if cursor else (_END_OF_TIME, "")
        params = {
            "before_updated_at": before[0],
            "before_session_id": before[1],
            "updated_since": canonical_timestamp(updated_since) if updated_since else "",
            "limit": limit,
        }
        if state is not None:
            params["state"] = SessionState(state).value

        def _list() -> Page[Session]:
            query = _Q["list_sessions" if state is None else "list_sessions_in_state"]
            rows = self.conn.execute(query, params)
            items = tuple(_from_row(Session, rows, values) for values in rows)
            last = items[-1] if len(items) == limit else None
            next_cursor = (
                None if last is None else _encode_cursor(str(last.updated_at), last.session_id)
            )
            return Page(items, next_cursor)

        return translated(self.path, _list)

    def list_events(
        self, session_id: str, *, after: str = "", limit: int = MAX_PAGE_SIZE
    ) -> list[SessionEvent]:
        def _list() -> list[SessionEvent]:
            rows = self.conn.execute(
                _Q["list_events"], {"session_id": session_id, "after": after, "limit": limit}
            )
            return [_from_row(SessionEvent, rows, values) for values in rows]

        return translated(self.path, _list)


P = ParamSpec("P")
R = TypeVar("R")


class WorkspaceStore:
    """The async store. One operation at a time per store, one thread hop each.

    async with await WorkspaceStore.open(Path("~/project").expanduser()) as store:
        session = await store.save(Session(title="fix the build"))
    """

    def __init__(self, database: WorkspaceDatabase) -> None:
        self._db = database
        self._limiter = anyio.CapacityLimiter(1)

    @classmethod
    async def open(cls, workspace_dir: Path, options: OpenOptions | None = None) -> Self:
        database = await anyio.to_thread.run_sync(WorkspaceDatabase, workspace_dir, options)
        return cls(database)

    @property
    def origin_id(self) -> str:
        return self._db.origin_id

    @property
    def path(self) -> Path:
        return self._db.path

    async def _run(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        def call() -> R:
            return fn(*args, **kwargs)

        return await anyio.to_thread.run_sync(call, limiter=self._limiter)

    async def save(self, entity: E) -> E:
        """Save (insert or update) an entity and queue its outbox record atomically.

        Returns the entity as stored, with `created_at` and a new `updated_at`.
        """
        return await self._run(self._db.save, entity)

    async def get(self, cls: type[E], entity_id: str) -> E | None:
        return await self._run(self._db.get, cls, entity_id)

    async def append_event(
        self, session_id: str, event_type: str, payload: Mapping[str, Any] | None = None
    ) -> SessionEvent:
        event = SessionEvent(session_id=session_id, event_type=event_type, payload=payload)
        return await self.save(event)

    async def list_sessions(
        self,
        *,
        state: SessionState | None = None,
        updated_since: str | None = None,
        limit: int = DEFAULT_PAGE_SIZE,
        cursor: str | None = None,
    ) -> Page[Session]:
        """Sessions, most recently updated first, one keyset page at a time."""
        return await self._run(
            self._db.list_sessions,
            state=state,
            updated_since=updated_since,
            limit=limit,
            cursor=cursor,
        )

    async def list_events(
        self, session_id: str, *, after: str = "", limit: int = MAX_PAGE_SIZE
    ) -> list[SessionEvent]:
        """A session's events in the order they were appended."""
        return await self._run(self._db.list_events, session_id, after=after, limit=limit)

    async def aclose(self) -> None:
        await self._run(self._db.close)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
