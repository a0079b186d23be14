"""Backoff policies. Pure: they answer "when next?" and do no I/O."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Final

JITTER: Final = 0.1


@dataclass(frozen=True, kw_only=True, slots=True)
class RecordRetryPolicy:
    """A record's own failures: 5 s, 10 s, 20 s ... capped at 3600 s, plus up to 10% jitter
    (still capped); dead after `max_attempts` failed attempts (AC-040, AC-041)."""

    base_seconds: float = 5.0
    cap_seconds: float = 3600.0
    max_attempts: int = 10
    rng: random.Random = field(default_factory=random.Random, compare=False)

    def delay(self, attempts: int) -> float:
        """The wait after the `attempts`-th failure (attempts >= 1)."""
        exact = min(self.cap_seconds, self.base_seconds * 2.0 ** min(attempts - 1, 64))
        return min(self.cap_seconds, exact * (1 + JITTER * self.rng.random()))

    def is_dead(self, attempts: int) -> bool:
        return attempts >= self.max_attempts

    def next_attempt(self, now: datetime, attempts: int) -> datetime:
        return now + timedelta(seconds=self.delay(attempts))


@dataclass(kw_only=True, slots=True)
class OutageBackoff:
    """A whole workspace waiting for PostgreSQL: jittered exponential, capped, reset on
    success. Outages never touch a record's attempts (X-003)."""

    base_seconds: float = 1.0
    cap_seconds: float = 60.0
    failures: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next_delay(self) -> float:
        self.failures += 1
        exact = min(self.cap_seconds, self.base_seconds * 2.0 ** min(self.failures - 1, 64))
        return exact / 2 + self.rng.random() * exact / 2

    def reset(self) -> None:
        self.failures = 0
