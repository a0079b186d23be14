"""The run-state model: entities, identifiers, timestamps, the session state machine.

Pure code: no I/O. Field names are the column names of the workspace tables, so an
entity's row, its outbox payload and its dataclass all use the same keys.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, ClassVar, TypeVar

from acode_sync.errors import InvalidTransitionError, RecordRejectedError

TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
CANONICAL_TIMESTAMP_LENGTH = len("2026-01-15T10:30:00.123456Z")
ONE_MICROSECOND = timedelta(microseconds=1)
MAX_ID_LENGTH = 200

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


def format_timestamp(moment: datetime) -> str:
    """The one canonical form of a time: UTC, microseconds, a `Z` suffix."""
    if moment.tzinfo is None:
        raise RecordRejectedError(f"timestamp {moment.isoformat()!r} has no time zone")
    return moment.astimezone(UTC).strftime(TIMESTAMP_FORMAT)


def parse_timestamp(text: str) -> datetime:
    """Accept any RFC 3339 timestamp (any offset, any fraction digits)."""
    try:
        moment = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        raise RecordRejectedError(f"{text!r} is not an RFC 3339 timestamp") from None
    if moment.tzinfo is None:
        raise RecordRejectedError(f"timestamp {text!r} has no UTC offset")
    return moment.astimezone(UTC)


_CANONICAL = re.compile(
    r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])T([01]\d|2[0-3]):[0-5]\d:[0-5]\d\.\d{6}Z"
)


def is_canonical_shape(text: str) -> bool:
    """Written as format_timestamp writes, every field in its range (an impossible day
    such as February 30 is not checked here: PostgreSQL refuses it)."""
    return _CANONICAL.fullmatch(text) is not None


def canonical_timestamp(text: str) -> str:
    if _CANONICAL.fullmatch(text):  # already canonical (the hot path): still a real time?
        try:
            datetime.fromisoformat(text[:-1])
        except ValueError:
            pass
        else:
            return text
    return format_timestamp(parse_timestamp(text))


def next_version(now: datetime, previous: str | None) -> str:
    """A new `updated_at`: the clock, but always strictly after the previous version.

    Two saves of one entity in the same clock tick (or under a clock that stepped back)
    still get distinct, increasing versions, so their idempotency keys never collide.
    """
    if previous is not None:
        floor = parse_timestamp(previous) + ONE_MICROSECOND
        if now < floor:
            now = floor
    return format_timestamp(now)


# Identifiers: a type prefix and a ULID (48-bit milliseconds + 80 random bits) in
# lowercase Crockford base32, so they sort by creation time as plain strings.
_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"
_RANDOM_BITS = 80


class _MonotonicUlid:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = -1
        self._last_random = 0

    def next(self) -> int:
        millis = time.time_ns() // 1_000_000
        with self._lock:
            if millis <= self._last_ms:
                millis = self._last_ms
                self._last_random += 1
            else:
                # One bit of headroom so increments within a millisecond cannot overflow.
                self._last_random = secrets.randbits(_RANDOM_BITS - 1)
            self._last_ms = millis
            return (millis << _RANDOM_BITS) | self._last_random


_ulid = _MonotonicUlid()


def new_id(prefix: str) -> str:
    value = _ulid.next()
    chars = [_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5)]
    return f"{prefix}_{''.join(chars)}"


class SessionState(StrEnum):
    CREATED = "CREATED"
    PLANNING = "PLANNING"
    AWAITING_APPROVAL = "AWAITING_APPROVAL"
    EXECUTING = "EXECUTING"
    PAUSED = "PAUSED"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


_S = SessionState
_ENDINGS = frozenset({_S.COMPLETED, _S.FAILED, _S.CANCELLED})
ALLOWED_TRANSITIONS: Mapping[SessionState, frozenset[SessionState]] = {
    _S.CREATED: frozenset({_S.PLANNING, _S.EXECUTING, _S.FAILED, _S.CANCELLED}),
    _S.PLANNING: frozenset({_S.AWAITING_APPROVAL, _S.EXECUTING, _S.PAUSED}) | _ENDINGS,
    _S.AWAITING_APPROVAL: frozenset(
        {_S.PLANNING, _S.EXECUTING, _S.PAUSED, _S.FAILED, _S.CANCELLED}
    ),
    _S.EXECUTING: frozenset({_S.PLANNING, _S.AWAITING_APPROVAL, _S.PAUSED}) | _ENDINGS,
    _S.PAUSED: frozenset(
        {_S.PLANNING, _S.AWAITING_APPROVAL, _S.EXECUTING, _S.FAILED, _S.CANCELLED}
    ),
    _S.COMPLETED: frozenset(),
    _S.FAILED: frozenset(),
    _S.CANCELLED: frozenset(),
}


def check_transition(current: SessionState | None, new: SessionState) -> None:
    """Refuse an illegal move. A new session starts in CREATED; staying put is allowed."""
    if current is None:
        if new != SessionState.CREATED:
            raise InvalidTransitionError(f"a new session must start in CREATED, not {new}")
        return
    if new != current and new not in ALLOWED_TRANSITIONS[current]:
        raise InvalidTransitionError(f"session cannot move from {current} to {new}")


def idempotency_key(entity_type: str, entity_id: str, updated_at: str) -> str:
    """`EntityType:entity_id:timestamp`, the timestamp in canonical form (AC-044)."""
    return f"{entity_type}:{entity_id}:{canonical_timestamp(updated_at)}"


@dataclass(frozen=True, kw_only=True, slots=True)
class Entity:
    """Fields shared by every entity. `created_at`/`updated_at` are set by the store."""

    entity_type: ClassVar[str]
    table: ClassVar[str]
    id_prefix: ClassVar[str]
    json_columns: ClassVar[frozenset[str]] = frozenset()

    session_id: str
    created_at: str | None = None
    updated_at: str | None = None

    @property
    def entity_id(self) -> str:
        raise NotImplementedError

    def row(self) -> dict[str, Any]:
        """The entity as a table row: column name -> value (JSON columns still decoded)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, kw_only=True, slots=True)
class Session(Entity):
    entity_type = "Session"
    table = "sessions"
    id_prefix = "sess"
    json_columns = frozenset({"metadata"})

    session_id: str = field(default_factory=lambda: new_id("sess"))
    state: SessionState = SessionState.CREATED
    title: str | None = None
    metadata: Any = None

    @property
    def entity_id(self) -> str:
        return self.session_id


@dataclass(frozen=True, kw_only=True, slots=True)
class SessionEvent(Entity):
    entity_type = "SessionEvent"
    table = "session_events"
    id_prefix = "evt"
    json_columns = frozenset({"payload"})

    event_id: str = field(default_factory=lambda: new_id("evt"))
    event_type: str
    payload: Any = None

    @property
    def entity_id(self) -> str:
        return self.event_id


@dataclass(frozen=True, kw_only=True, slots=True)
class SessionTask(Entity):
    entity_type = "SessionTask"
    table = "session_tasks"
    id_prefix = "task"

    task_id: str = field(default_factory=lambda: new_id("task"))
    status: str = "pending"
    title: str | None = None

    @property
    def entity_id(self) -> str:
        return self.task_id


@dataclass(frozen=True, kw_only=True, slots=True)
class Step(Entity):
    entity_type = "Step"
    table = "steps"
    id_prefix = "step"

    step_id: str = field(default_factory=lambda: new_id("step"))
    task_id: str
    status: str = "pending"
    description: str | None = None

    @property
    def entity_id(self) -> str:
        return self.step_id


@dataclass(frozen=True, kw_only=True, slots=True)
class ToolCall(Entity):
    entity_type = "ToolCall"
    table = "tool_calls"
    id_prefix = "tc"
    json_columns = frozenset({"arguments", "result"})

    tool_call_id: str = field(default_factory=lambda: new_id("tc"))
    step_id: str
    name: str
    arguments: Any = None
    result: Any = None
    status: str = "pending"

    @property
    def entity_id(self) -> str:
        return self.tool_call_id


@dataclass(frozen=True, kw_only=True, slots=True)
class Artifact(Entity):
    entity_type = "Artifact"
    table = "artifacts"
    id_prefix = "art"

    artifact_id: str = field(default_factory=lambda: new_id("art"))
    type: str
    content: str
    name: str | None = None

    @property
    def entity_id(self) -> str:
        return self.artifact_id


E = TypeVar("E", bound=Entity)

ENTITY_CLASSES: tuple[type[Entity], ...] = (
    Session,
    SessionEvent,
    SessionTask,
    Step,
    ToolCall,
    Artifact,
)
ENTITY_BY_TYPE: Mapping[str, type[Entity]] = {cls.entity_type: cls for cls in ENTITY_CLASSES}


def validate_entity(entity: Entity) -> None:
    """Refuse identifiers without their type prefix and empty required text."""
    if not entity.entity_id.startswith(f"{entity.id_prefix}_"):
        raise RecordRejectedError(
            f"{entity.entity_type} id {entity.entity_id[:80]!r} must start with {entity.id_prefix}_"
        )
    if len(entity.entity_id) > MAX_ID_LENGTH:
        raise RecordRejectedError(f"{entity.entity_type} id is longer than {MAX_ID_LENGTH}")
    if not entity.session_id.startswith("sess_"):
        raise RecordRejectedError(f"session id {entity.session_id[:80]!r} must start with sess_")


def stamped(entity: E, *, created_at: str, updated_at: str) -> E:
    return replace(entity, created_at=created_at, updated_at=updated_at)
