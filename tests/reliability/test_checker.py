"""The checker can fail: a hand-made case with exactly 1 lost record, 1 duplicate effect
and 1 wrong winner (and the clean variant, which it must pass)."""

from __future__ import annotations

import pytest

from tests.reliability.checker import (
    AuditRow,
    EntityRow,
    LedgerRecord,
    OutboxRow,
    RejectedRow,
    compare,
)

pytestmark = [pytest.mark.reliability]

O1, O2 = "origin-a", "origin-b"
T1, T2, T3 = (
    "2026-01-01T00:00:01.000000Z",
    "2026-01-01T00:00:02.000000Z",
    "2026-01-01T00:00:03.000000Z",
)


def rec(entity_id: str, ts: str, origin: str = O1, title: str = "") -> LedgerRecord:
    return LedgerRecord(
        key=f"Session:{entity_id}:{ts}",
        entity_type="Session",
        entity_id=entity_id,
        updated_at=ts,
        origin=origin,
        check_column="title",
        check_value=title or f"{entity_id}@{ts}",
    )


def audit(r: LedgerRecord) -> AuditRow:
    return AuditRow(r.key, r.entity_type, r.entity_id, r.updated_at, r.origin)


def row(r: LedgerRecord, title: str | None = None) -> EntityRow:
    return EntityRow(
        r.entity_type,
        r.entity_id,
        r.key,
        r.updated_at,
        r.origin,
        {"title": r.check_value if title is None else title},
    )


def outbox(records: list[LedgerRecord], state: str = "processed") -> list[OutboxRow]:
    return [OutboxRow("ws", r.key, state, 0) for r in records]


# a: two versions, both applied, the later one held: fine.
A1, A2 = rec("sess_a", T1), rec("sess_a", T2)
# b: one version, applied twice (a duplicate effect).
B1 = rec("sess_b", T1)
# c: one version, never applied, not dead: lost.
C1 = rec("sess_c", T1)
# d: two versions applied, but PostgreSQL holds the older one: wrong winner.
D1, D2 = rec("sess_d", T1), rec("sess_d", T3)
# e: two origins; O1's older record lost LWW (a conflict, winner current): not lost.
E1, E2 = rec("sess_e", T2, O2), rec("sess_e", T1, O1)
# f: dead letter: not lost, and no row expected.
F1 = rec("sess_f", T1)
LEDGER = [A1, A2, B1, C1, D1, D2, E1, E2, F1]
REJECTED = [RejectedRow(E2.key, E2.order, E1.order)]


def test_the_checker_reports_one_lost_one_duplicate_one_wrong_winner() -> None:
    report = compare(
        LEDGER,
        [audit(A1), audit(A2), audit(B1), audit(B1), audit(D1), audit(D2), audit(E1)],
        [row(A2), row(B1), row(D1), row(E1)],
        REJECTED,
        outbox([A1, A2, B1, C1, D1, D2, E1, E2]) + outbox([F1], "dead"),
        resends=3,
    )
    assert report.lost == [C1.key]
    assert report.duplicates == {B1.key: 2}
    assert len(report.wrong_winners) == 1
    assert "sess_d" in report.wrong_winners[0]
    assert (report.dead, report.superseded, report.resends) == (1, 1, 3)
    assert report.stuck == []
    assert not report.clean


def test_a_clean_run_passes_and_extra_outbox_records_are_unledgered() -> None:
    unledgered = rec("sess_u", T1)
    report = compare(
        [A1, A2, B1, E1, E2, F1],
        [audit(A1), audit(A2), audit(B1), audit(E1), audit(unledgered)],
        [row(A2), row(B1), row(E1), row(unledgered)],
        REJECTED,
        outbox([A1, A2, B1, E1, E2, unledgered]) + outbox([F1], "dead"),
    )
    assert report.clean, report.details()
    assert report.unledgered == [unledgered.key]
    assert report.lost == []


def test_stuck_content_and_inconsistent_conflicts_are_reported() -> None:
    report = compare(
        [A1, A2],
        [audit(A1), audit(A2)],
        [row(A2, title="something else")],
        [RejectedRow(E1.key, E1.order, E2.order)],  # kept an older current: wrong
        outbox([A1]) + outbox([A2], "pending"),
    )
    assert report.stuck == [f"ws: {A2.key}"]
    assert len(report.wrong_winners) == 2
    assert any("title is 'something else'" in w for w in report.wrong_winners)
