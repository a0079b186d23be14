"""What the syncer checks in a record before it ships it (docs/sync.md)."""

from __future__ import annotations

import hashlib
from datetime import timedelta

import pytest

from acode_sync.errors import RecordRejectedError
from acode_sync.outbox import OutboxRecord
from acode_sync.sync import prepare

NOW = "2026-12-01T12:00:00.000000Z"
SKEW = timedelta(minutes=5)
LATEST = "2026-12-01T12:05:00.000000Z"  # the clock plus five minutes of skew
VERSION = "2026-12-01T11:00:00.000000Z"


def record(
    *,
    key: str | None = None,
    entity_id: str = "sess_x",
    session_id: str | None = "sess_x",
    payload: bytes = b'{"state": "CREATED"}',
    base: str | None = None,
) -> OutboxRecord:
    key = key if key is not None else f"Session:{entity_id}:{VERSION}"
    return OutboxRecord(1, key, "Session", entity_id, session_id, payload, base, NOW, 0)


def test_a_canonical_record_is_prepared_as_it_is() -> None:
    prepared = prepare(record(base=VERSION), max_payload_bytes=100, latest=LATEST, skew=SKEW)
    assert prepared.idempotency_key == f"Session:sess_x:{VERSION}"
    assert prepared.version == VERSION
    assert prepared.base_updated_at == VERSION
    assert len(prepared.digest) == 32


@pytest.mark.parametrize(
    "stamp",
    [
        "2026-01-15T11:30:00+01:00",  # an offset: canonical means UTC with Z
        "2026-01-15T10:30:00Z",  # no fraction
        "2026-01-15T10:30:00.000000",  # no zone
        "2026-01-15T24:00:00.000000Z",  # hour 24
        "2026-01-15T10:60:00.000000Z",
        "2026-13-01T10:00:00.000000Z",
        "2026-00-10T10:00:00.000000Z",
        "2026-01-32T10:00:00.000000Z",
        "yesterday                 Z",
        "infinity",
        "epoch",
    ],
)
def test_a_time_that_is_not_canonical_rfc3339_utc_is_refused(stamp: str) -> None:
    with pytest.raises(RecordRejectedError, match=r"canonical RFC 3339 UTC|idempotency key"):
        prepare(
            record(key=f"Session:sess_x:{stamp}"), max_payload_bytes=100, latest=LATEST, skew=SKEW
        )
    with pytest.raises(RecordRejectedError, match="base_updated_at"):
        prepare(record(base=stamp), max_payload_bytes=100, latest=LATEST, skew=SKEW)


def test_a_version_far_ahead_of_the_clock_is_not_shipped() -> None:
    future = "2099-01-01T00:00:00.000000Z"
    with pytest.raises(RecordRejectedError, match="ahead of this machine's clock"):
        prepare(
            record(key=f"Session:sess_x:{future}"), max_payload_bytes=100, latest=LATEST, skew=SKEW
        )
    near = "2026-12-01T12:04:59.999999Z"  # within the skew
    assert prepare(
        record(key=f"Session:sess_x:{near}"), max_payload_bytes=100, latest=LATEST, skew=SKEW
    )


@pytest.mark.parametrize("payload", [b"[1, 2]", b'"text"', b"42", b"null", b" \n[]", b""])
def test_a_payload_that_is_not_a_json_object_is_refused(payload: bytes) -> None:
    with pytest.raises(RecordRejectedError, match="not a JSON object"):
        prepare(record(payload=payload), max_payload_bytes=100, latest=LATEST, skew=SKEW)


def test_ids_past_the_documented_limit_are_refused() -> None:
    long_id = "s" * 201
    with pytest.raises(RecordRejectedError, match="entity_id is 201 characters"):
        prepare(record(entity_id=long_id), max_payload_bytes=100, latest=LATEST, skew=SKEW)
    with pytest.raises(RecordRejectedError, match="session_id is 10000 characters"):
        prepare(record(session_id="s" * 10_000), max_payload_bytes=100, latest=LATEST, skew=SKEW)
    with pytest.raises(RecordRejectedError, match="entity_id is 0 characters"):
        prepare(record(entity_id=""), max_payload_bytes=100, latest=LATEST, skew=SKEW)
    assert prepare(record(entity_id="s" * 200), max_payload_bytes=100, latest=LATEST, skew=SKEW)


def test_other_bad_records_are_refused() -> None:
    unknown = OutboxRecord(1, f"X:1:{VERSION}", "X", "1", None, b"{}", None, NOW, 0)
    with pytest.raises(RecordRejectedError, match="unknown entity type"):
        prepare(unknown, max_payload_bytes=100, latest=LATEST, skew=SKEW)
    with pytest.raises(RecordRejectedError, match="max_payload_bytes"):
        prepare(record(), max_payload_bytes=1, latest=LATEST, skew=SKEW)
    with pytest.raises(RecordRejectedError, match="idempotency key"):
        prepare(
            record(key=f"Session:other:{VERSION}"), max_payload_bytes=100, latest=LATEST, skew=SKEW
        )
    unreadable = record()._replace(readable=False)
    with pytest.raises(RecordRejectedError, match="UTF-8"):
        prepare(unreadable, max_payload_bytes=100, latest=LATEST, skew=SKEW)


def test_the_next_version_after_the_clock_stepped_back_ships() -> None:
    """The clock ran an hour ahead, a version was shipped, then the clock stepped back: the
    store's next version is the previous one plus a microsecond, as far ahead as it."""
    ahead = "2026-12-01T13:00:00.000000Z"  # an hour past NOW
    after = "2026-12-01T13:00:00.000001Z"
    ok = record(key=f"Session:sess_x:{after}", base=ahead)
    assert prepare(ok, max_payload_bytes=100, latest=LATEST, skew=SKEW).version == after
    jump = record(key="Session:sess_x:2099-01-01T00:00:00.000000Z", base=ahead)
    with pytest.raises(RecordRejectedError, match="ahead of this machine's clock"):
        prepare(jump, max_payload_bytes=100, latest=LATEST, skew=SKEW)


@pytest.mark.parametrize(
    ("payload", "refused"),
    [
        (b'{"name": "grep"}', True),
        (b'{"name": "grep", "session_id": "sess_x"}', False),
        (b'{"name": "grep", "session\\u005fid": "sess_x"}', False),  # PostgreSQL reads it
    ],
)
def test_a_record_that_names_no_session_is_refused_before_it_ships(
    payload: bytes, refused: bool
) -> None:
    orphan = OutboxRecord(
        1, f"ToolCall:tc_1:{VERSION}", "ToolCall", "tc_1", None, payload, None, NOW, 0
    )
    if refused:
        with pytest.raises(RecordRejectedError, match="names no session"):
            prepare(orphan, max_payload_bytes=1000, latest=LATEST, skew=SKEW)
    else:
        prepared = prepare(orphan, max_payload_bytes=1000, latest=LATEST, skew=SKEW)
        assert prepared.session_id is None


def test_a_session_without_a_session_id_is_its_own_session() -> None:
    prepared = prepare(
        record(session_id=None, payload=b"{}"), max_payload_bytes=100, latest=LATEST, skew=SKEW
    )
    assert prepared.entity_id == "sess_x"


def test_a_record_ships_with_its_canonical_digest_where_the_syncer_can_spell_it() -> None:
    spelled = prepare(
        record(payload=b'{"title":"t","state":"CREATED"}'),
        max_payload_bytes=1000, latest=LATEST, skew=SKEW,
    )  # fmt: skip
    canonical = b'{"state": "CREATED", "title": "t"}'  # jsonb's order and spacing
    assert spelled.canonical_digest == hashlib.sha256(canonical).digest()
    left = prepare(record(payload=b'{"n": 0.5}'), max_payload_bytes=1000, latest=LATEST, skew=SKEW)
    assert left.canonical_digest is None  # PostgreSQL spells a fraction as a numeric
