from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from acode_sync.domain import (
    ALLOWED_TRANSITIONS,
    ENTITY_BY_TYPE,
    Artifact,
    Entity,
    Session,
    SessionEvent,
    SessionState,
    SessionTask,
    Step,
    ToolCall,
    canonical_timestamp,
    check_transition,
    format_timestamp,
    idempotency_key,
    new_id,
    next_version,
    parse_timestamp,
    validate_entity,
)
from acode_sync.errors import InvalidTransitionError, RecordRejectedError

aware_datetimes = st.datetimes(
    min_value=datetime(1970, 1, 2),
    max_value=datetime(9998, 12, 31),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)), timezone.min]),
)


def test_timestamp_format_is_utc_with_microseconds_and_z() -> None:
    moment = datetime(2026, 1, 15, 10, 30, 0, 123456, tzinfo=UTC)
    assert format_timestamp(moment) == "2026-01-15T10:30:00.123456Z"
    assert format_timestamp(moment.replace(microsecond=0)) == "2026-01-15T10:30:00.000000Z"


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("2026-01-15T10:30:00Z", "2026-01-15T10:30:00.000000Z"),
        ("2026-01-15T12:30:00.5+02:00", "2026-01-15T10:30:00.500000Z"),
        ("2026-01-15T10:30:00.123456789Z", "2026-01-15T10:30:00.123456Z"),
        ("2026-01-15 10:30:00.123456+00:00", "2026-01-15T10:30:00.123456Z"),
    ],
)
def test_any_rfc3339_timestamp_is_read_into_the_canonical_form(text: str, canonical: str) -> None:
    assert canonical_timestamp(text) == canonical


@pytest.mark.parametrize("text", ["2026-01-15T10:30:00", "yesterday", "", "2026-13-01T00:00:00Z"])
def test_timestamps_without_offset_or_unparseable_are_rejected(text: str) -> None:
    with pytest.raises(RecordRejectedError):
        parse_timestamp(text)


def test_naive_datetime_cannot_be_formatted() -> None:
    with pytest.raises(RecordRejectedError, match="no time zone"):
        format_timestamp(datetime(2026, 1, 1))


@given(aware_datetimes)
def test_canonical_form_round_trips(moment: datetime) -> None:
    text = format_timestamp(moment)
    assert parse_timestamp(text) == moment
    assert canonical_timestamp(text) == text


@given(aware_datetimes, aware_datetimes)
def test_canonical_text_sorts_like_time(a: datetime, b: datetime) -> None:
    assert (format_timestamp(a) < format_timestamp(b)) == (a < b)


@given(aware_datetimes, st.none() | aware_datetimes)
def test_next_version_is_strictly_after_the_previous_one(
    now: datetime, prev: datetime | None
) -> None:
    previous = None if prev is None else format_timestamp(prev)
    version = next_version(now, previous)
    if previous is not None:
        assert version > previous
    assert parse_timestamp(version) >= now.replace(microsecond=now.microsecond)


def test_next_version_in_the_same_tick_still_moves_forward() -> None:
    now = datetime(2026, 1, 15, 10, 30, tzinfo=UTC)
    first = next_version(now, None)
    second = next_version(now, first)
    third = next_version(now - timedelta(seconds=5), second)  # the clock stepped back
    assert first < second < third
    assert third == "2026-01-15T10:30:00.000002Z"


def test_idempotency_key_format() -> None:
    key = idempotency_key("Session", "sess_abc123", "2026-01-15T10:30:00Z")
    assert key == "Session:sess_abc123:2026-01-15T10:30:00.000000Z"


@pytest.mark.parametrize(
    ("cls", "prefix"),
    [
        (Session, "sess_"),
        (SessionTask, "task_"),
        (Step, "step_"),
        (ToolCall, "tc_"),
        (Artifact, "art_"),
        (SessionEvent, "evt_"),
    ],
)
def test_ids_carry_their_type_prefix(cls: type[Entity], prefix: str) -> None:
    assert cls.id_prefix + "_" == prefix
    assert new_id(cls.id_prefix).startswith(prefix)


def test_ids_sort_by_creation_time() -> None:
    ids = [new_id("sess") for _ in range(5000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert all(len(i) == len("sess_") + 26 for i in ids)


def test_entity_types_are_registered_by_name() -> None:
    assert set(ENTITY_BY_TYPE) == {
        "Session",
        "SessionEvent",
        "SessionTask",
        "Step",
        "ToolCall",
        "Artifact",
    }


def test_validate_entity_refuses_ids_without_their_prefix() -> None:
    with pytest.raises(RecordRejectedError, match="must start with sess_"):
        validate_entity(Session(session_id="abc"))
    with pytest.raises(RecordRejectedError, match="must start with task_"):
        validate_entity(SessionTask(session_id="sess_1", task_id="step_1"))
    with pytest.raises(RecordRejectedError, match="session id"):
        validate_entity(SessionTask(session_id="nope"))
    with pytest.raises(RecordRejectedError, match="longer than"):
        validate_entity(Session(session_id="sess_" + "x" * 300))
    validate_entity(SessionTask(session_id="sess_1"))


LEGAL = [
    (SessionState.CREATED, SessionState.PLANNING),
    (SessionState.PLANNING, SessionState.AWAITING_APPROVAL),
    (SessionState.AWAITING_APPROVAL, SessionState.EXECUTING),
    (SessionState.EXECUTING, SessionState.PAUSED),
    (SessionState.PAUSED, SessionState.EXECUTING),
    (SessionState.EXECUTING, SessionState.COMPLETED),
    (SessionState.PLANNING, SessionState.CANCELLED),
    (SessionState.EXECUTING, SessionState.FAILED),
]
ILLEGAL = [
    (SessionState.COMPLETED, SessionState.EXECUTING),
    (SessionState.FAILED, SessionState.PLANNING),
    (SessionState.CANCELLED, SessionState.CREATED),
    (SessionState.PLANNING, SessionState.CREATED),
    (SessionState.CREATED, SessionState.COMPLETED),
    (SessionState.CREATED, SessionState.AWAITING_APPROVAL),
]


@pytest.mark.parametrize(("current", "new"), LEGAL)
def test_legal_transitions_pass(current: SessionState, new: SessionState) -> None:
    check_transition(current, new)


@pytest.mark.parametrize(("current", "new"), ILLEGAL)
def test_illegal_transitions_are_refused(current: SessionState, new: SessionState) -> None:
    with pytest.raises(InvalidTransitionError) as info:
        check_transition(current, new)
    assert info.value.code == "ACODE-DB-006"


def test_new_session_must_start_in_created() -> None:
    check_transition(None, SessionState.CREATED)
    with pytest.raises(InvalidTransitionError, match="must start in CREATED"):
        check_transition(None, SessionState.EXECUTING)


@given(st.sampled_from(SessionState), st.sampled_from(SessionState))
def test_transition_rule_matches_the_table(current: SessionState, new: SessionState) -> None:
    allowed = new is current or new in ALLOWED_TRANSITIONS[current]
    try:
        check_transition(current, new)
    except InvalidTransitionError:
        assert not allowed
    else:
        assert allowed


def test_ending_states_are_final() -> None:
    for state in (SessionState.COMPLETED, SessionState.FAILED, SessionState.CANCELLED):
        assert ALLOWED_TRANSITIONS[state] == frozenset()
    assert set(ALLOWED_TRANSITIONS) == set(SessionState)
