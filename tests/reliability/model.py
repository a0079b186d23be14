"""The generative checker's reference model: what PostgreSQL must hold, given what the
writers' SQLite commits accepted.

Pure: the driver (test_generative.py) records accepted versions here and hands over an
`Observed` snapshot of PostgreSQL and the outboxes; `invariants()` holds at every moment,
`final_problems()` once everything has been drained. Each returns sentences, one per
problem, empty when the engine behaved.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

Entity = tuple[str, str]  # (entity type, entity id)
Ident = tuple[str, str]  # (idempotency key, origin): one change from one writer
# SQLSTATE classes that are the record's own fault (data, integrity, program limit).
RECORD_FAULT_PREFIXES = ("22", "23", "54")


@dataclass(frozen=True, slots=True)
class Version:
    """One change one origin accepted: an outbox record."""

    entity_type: str
    entity_id: str
    session_id: str
    origin: str
    updated_at: str  # canonical; the key's timestamp
    base: str | None
    text: str  # the title or content the PostgreSQL row shows when this version wins
    poison: bool = False  # PostgreSQL must refuse it (a record's own fault)
    stamp_mismatch: bool = False  # its payload's updated_at contradicts its key

    @property
    def key(self) -> str:
        return f"{self.entity_type}:{self.entity_id}:{self.updated_at}"

    @property
    def ident(self) -> Ident:
        return (self.key, self.origin)

    @property
    def entity(self) -> Entity:
        return (self.entity_type, self.entity_id)

    @property
    def order(self) -> tuple[str, str, str]:
        """Last write wins on (updated_at, origin_id, idempotency_key)."""
        return (self.updated_at, self.origin, self.key)


@dataclass(frozen=True, slots=True)
class Write:
    """One entity write PostgreSQL committed (an audit row), in commit order."""

    entity: Entity
    key: str
    origin: str
    updated_at: str

    @property
    def ident(self) -> Ident:
        return (self.key, self.origin)


@dataclass(frozen=True, slots=True)
class Held:
    """The row PostgreSQL holds for an entity."""

    key: str
    origin: str
    updated_at: str
    text: str | None


@dataclass(frozen=True, slots=True)
class ConflictRow:
    entity: Entity
    incoming: Ident
    incoming_updated_at: str
    current: Ident
    current_updated_at: str
    winner: str


@dataclass(frozen=True, slots=True)
class OutboxRow:
    origin: str
    outbox_id: int
    key: str
    state: str
    attempts: int
    errors: int
    processed_at: str | None
    last_error: str | None

    @property
    def ident(self) -> Ident:
        return (self.key, self.origin)


@dataclass(frozen=True, slots=True)
class Observed:
    writes: list[Write]
    held: dict[Entity, Held]
    conflicts: list[ConflictRow]
    outbox: list[OutboxRow]


@dataclass
class Model:
    versions: dict[Ident, Version] = field(default_factory=dict)
    # Records a writer deleted while pending: PostgreSQL may or may not have them.
    withdrawn: set[Ident] = field(default_factory=set)
    # Versions PostgreSQL had applied when its applied keys were pruned. A late resend of
    # one that was since replaced loses last-write-wins and changes nothing, but with its
    # key forgotten PostgreSQL cannot tell it from a late change: it may be recorded as
    # a conflict that the current version won (docs/sync.md, late resends).
    forgotten: set[Ident] = field(default_factory=set)

    def accept(self, version: Version) -> None:
        self.versions[version.ident] = version
        self.withdrawn.discard(version.ident)

    def withdraw(self, ident: Ident) -> None:
        self.withdrawn.add(ident)

    def of_entity(self, entity: Entity) -> list[Version]:
        return [v for v in self.versions.values() if v.entity == entity]


def _order(updated_at: str, ident: Ident) -> tuple[str, str, str]:
    key, origin = ident
    return (updated_at, origin, key)


def invariants(model: Model, seen: Observed) -> list[str]:
    """What holds at every moment, whatever is still in flight."""
    problems: list[str] = []
    versions = model.versions
    applied = Counter(w.ident for w in seen.writes)
    problems += [f"{ident} applied {n} times" for ident, n in applied.items() if n > 1]
    problems += [
        f"{w.ident} applied but never accepted" for w in seen.writes if w.ident not in versions
    ]
    for w in seen.writes:
        version = versions.get(w.ident)
        if version is not None and (version.poison or version.stamp_mismatch):
            problems.append(f"{w.ident} applied although PostgreSQL must refuse it")

    # The row held is the greatest version PostgreSQL was given for its entity.
    given: dict[Entity, set[tuple[str, Ident]]] = defaultdict(set)
    for w in seen.writes:
        given[w.entity].add((w.updated_at, w.ident))
    for c in seen.conflicts:
        given[c.entity].add((c.incoming_updated_at, c.incoming))
    for entity, candidates in given.items():
        _, best = max(candidates, key=lambda c: _order(*c))
        row = seen.held.get(entity)
        if row is None or (row.key, row.origin) != best:
            problems.append(f"{entity}: holds {row and (row.key, row.origin)}, winner is {best}")
        elif best in versions and row.text != versions[best].text:
            problems.append(
                f"{entity}: holds {row.text!r}, the winner's is {versions[best].text!r}"
            )

    for c in seen.conflicts:
        if c.incoming == c.current:
            problems.append(f"{c.incoming} recorded as a conflict with itself")
        incoming_wins = _order(c.incoming_updated_at, c.incoming) > _order(
            c.current_updated_at, c.current
        )
        if (c.winner == "incoming") != incoming_wins:
            problems.append(f"conflict {c.incoming} vs {c.current}: wrong winner {c.winner}")
        if c.winner == "current" and c.incoming in applied and c.incoming not in model.forgotten:
            problems.append(f"{c.incoming} was applied before, yet its resend lost as a conflict")

    problems += _overlaps_unrecorded(model, seen)
    problems += _outbox_problems(model, seen.outbox)
    return problems


def _overlaps_unrecorded(model: Model, seen: Observed) -> list[str]:
    """Each write that replaced a version it was not based on must be in conflicts."""
    recorded = {(c.incoming, c.current) for c in seen.conflicts}
    previous: dict[Entity, Write] = {}
    problems = []
    for w in seen.writes:
        before = previous.get(w.entity)
        previous[w.entity] = w
        version = model.versions.get(w.ident)
        if before is None or version is None:
            continue
        if version.base is None:
            overlap = w.updated_at <= before.updated_at
        else:
            overlap = version.base != before.updated_at
        if overlap and (w.ident, before.ident) not in recorded:
            problems.append(f"{w.ident} replaced {before.ident} (base {version.base}): no conflict")
    return problems


def _outbox_problems(model: Model, rows: Iterable[OutboxRow]) -> list[str]:
    problems = []
    for row in rows:
        version = model.versions.get(row.ident)
        own_fault = version is not None and (version.poison or version.stamp_mismatch)
        if (row.state == "processed") != (row.processed_at is not None):
            problems.append(f"{row.ident}: state {row.state} with processed_at {row.processed_at}")
        if not own_fault and (row.attempts or row.errors or row.state == "dead"):
            problems.append(
                f"{row.ident}: charged for the server's state: {row.state}, "
                f"{row.attempts} attempts, {row.errors} errors, {row.last_error!r}"
            )
        if row.state == "dead" and not (row.last_error or "").startswith(RECORD_FAULT_PREFIXES):
            problems.append(f"{row.ident}: dead for an error not its own: {row.last_error!r}")
    return problems


def final_problems(model: Model, seen: Observed) -> list[str]:
    """Once nothing is in flight: nothing lost or stuck, and every entity's winner right."""
    problems = invariants(model, seen)
    applied = {w.ident for w in seen.writes}
    lost_lww = {c.incoming for c in seen.conflicts if c.winner == "current"}
    dead = {row.ident for row in seen.outbox if row.state == "dead"}
    problems += [f"{row.ident}: still {row.state}" for row in seen.outbox if row.state == "pending"]
    expected: dict[Entity, Version] = {}
    for ident, version in model.versions.items():
        if ident in model.withdrawn and ident not in applied:
            continue  # deleted before it was shipped
        if version.poison or version.stamp_mismatch:
            # A losing version is never written, so nothing refuses it: it lost LWW.
            if ident not in dead and ident not in lost_lww:
                problems.append(f"{ident}: must end dead (its own fault) or lose LWW")
            continue
        if ident not in applied and ident not in lost_lww:
            problems.append(f"{ident}: lost (never applied, no conflict recorded)")
        best = expected.get(version.entity)
        if best is None or version.order > best.order:
            expected[version.entity] = version
    for entity, winner in expected.items():
        row = seen.held.get(entity)
        if row is None or (row.key, row.origin) != winner.ident:
            problems.append(
                f"{entity}: holds {row and (row.key, row.origin)}, LWW winner {winner.ident}"
            )
    return problems
