"""The generative checker's model on hand-made histories: it must name each kind of
problem, and nothing on a history where the engine behaved."""

from __future__ import annotations

from tests.reliability.model import (
    ConflictRow,
    Held,
    Model,
    Observed,
    OutboxRow,
    Version,
    Write,
    final_problems,
    invariants,
)

T1, T2, T3 = (f"2026-01-15T10:30:00.00000{n}Z" for n in (1, 2, 3))
ENTITY = ("Session", "sess_a")


def version(origin: str, stamp: str, base: str | None = None, **flags: bool) -> Version:
    return Version("Session", "sess_a", "sess_a", origin, stamp, base, f"{origin}@{stamp}", **flags)


def write(v: Version) -> Write:
    return Write(v.entity, v.key, v.origin, v.updated_at)


def held(v: Version) -> dict[tuple[str, str], Held]:
    return {v.entity: Held(v.key, v.origin, v.updated_at, v.text)}


def conflict(incoming: Version, current: Version, winner: str) -> ConflictRow:
    return ConflictRow(
        ENTITY, incoming.ident, incoming.updated_at, current.ident, current.updated_at, winner
    )


def processed(v: Version, outbox_id: int, **changes: object) -> OutboxRow:
    row = {
        "state": "processed",
        "attempts": 0,
        "errors": 0,
        "processed_at": T3,
        "last_error": None,
        **changes,
    }
    return OutboxRow(v.origin, outbox_id, v.key, **row)  # type: ignore[arg-type]


def model_of(*versions: Version) -> Model:
    model = Model()
    for v in versions:
        model.accept(v)
    return model


def test_a_clean_overlap_reports_nothing() -> None:
    a, b = version("a", T1), version("b", T2, base=T1)  # b based on a: no overlap
    c = version("c", T1)  # the same key as a from another origin, which loses
    seen = Observed(
        writes=[write(a), write(b)],
        held=held(b),
        conflicts=[conflict(c, b, "current")],
        outbox=[processed(a, 1), processed(b, 1), processed(c, 1)],
    )
    assert final_problems(model_of(a, b, c), seen) == []


def test_every_kind_of_problem_is_named() -> None:
    a, b = version("a", T1), version("b", T2)  # b not based on a: an overlap
    lost = version("a", T3)
    seen = Observed(
        writes=[write(a), write(b), write(b)],  # b applied twice, no conflict recorded
        held=held(a),  # the loser held
        conflicts=[conflict(a, a, "current")],  # a conflict with itself
        outbox=[
            processed(a, 1, attempts=1, errors=1, last_error="PostgreSQL ...: 25006"),
            processed(b, 1, processed_at=None),
            processed(lost, 2, state="pending", processed_at=None),
        ],
    )
    problems = final_problems(model_of(a, b, lost), seen)
    expected = [
        "applied 2 times",
        "winner is",
        "conflict with itself",
        "was applied before, yet its resend lost",
        "no conflict",
        "charged for the server's state",
        "state processed with processed_at None",
        "still pending",
        "lost (never applied",
        "LWW winner",
    ]
    for text in expected:
        assert any(text in p for p in problems), (text, problems)


def test_a_poison_record_must_be_refused() -> None:
    bad = version("a", T1, poison=True)
    dead = processed(
        bad, 1, state="dead", attempts=3, errors=3, processed_at=None, last_error="23514: check"
    )
    assert invariants(model_of(bad), Observed([], {}, [], [dead])) == []
    applied = Observed([write(bad)], held(bad), [], [processed(bad, 1)])
    assert any("must refuse" in p for p in invariants(model_of(bad), applied))
    outage = processed(
        bad, 1, state="dead", attempts=3, processed_at=None, last_error="PostgreSQL ...: 57014"
    )
    assert any(
        "not its own" in p for p in invariants(model_of(bad), Observed([], {}, [], [outage]))
    )
