from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from acode_sync.retry import JITTER, OutageBackoff, RecordRetryPolicy


def test_record_backoff_schedule_doubles_from_5s_to_the_cap() -> None:
    policy = RecordRetryPolicy(rng=random.Random(1))
    exact = [5, 10, 20, 40, 80, 160, 320, 640, 1280, 2560, 3600, 3600]
    for attempts, expected in enumerate(exact, start=1):
        delay = policy.delay(attempts)
        assert expected <= delay <= min(3600, expected * (1 + JITTER))


@given(st.integers(min_value=1, max_value=10_000), st.integers(min_value=0))
def test_record_backoff_never_exceeds_the_cap(attempts: int, seed: int) -> None:
    policy = RecordRetryPolicy(rng=random.Random(seed))
    assert 5 <= policy.delay(attempts) <= 3600


def test_dead_after_max_attempts() -> None:
    policy = RecordRetryPolicy()
    assert [policy.is_dead(n) for n in (1, 9, 10, 11)] == [False, False, True, True]


def test_next_attempt_is_now_plus_delay() -> None:
    policy = RecordRetryPolicy(rng=random.Random(3))
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert now + timedelta(seconds=5) <= policy.next_attempt(now, 1) <= now + timedelta(seconds=5.5)


def test_outage_backoff_grows_with_jitter_and_resets() -> None:
    backoff = OutageBackoff(rng=random.Random(7))
    delays = [backoff.next_delay() for _ in range(10)]
    for n, delay in enumerate(delays):
        exact = min(60.0, 2.0**n)
        assert exact / 2 <= delay <= exact
    backoff.reset()
    assert backoff.next_delay() <= 1.0
