"""The scheduled verify's slots: inside the window, spread by the path's hash, one per
interval; and its settings checked like every other."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from acode_sync.config import DaemonSettings, parse_config
from acode_sync.errors import ConfigError
from acode_sync.verify_schedule import VerifySchedule, slot_fraction

HOUR = 3600.0


@pytest.fixture(autouse=True, params=["UTC", "Europe/Berlin"])
def local_time(request: pytest.FixtureRequest) -> Iterator[None]:
    """Local time as the daemon sees it, with and without summer time."""
    saved = os.environ.get("TZ")
    os.environ["TZ"] = request.param
    time.tzset()
    yield
    if saved is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = saved
    time.tzset()


def schedule(hours: float, window: str = "") -> VerifySchedule:
    found = VerifySchedule.of(DaemonSettings(verify_interval_hours=hours, verify_window=window))
    assert found is not None
    return found


def minutes(at: float) -> int:
    local = datetime.fromtimestamp(at)
    return local.hour * 60 + local.minute


def runs(plan: VerifySchedule, fraction: float, start: float, count: int) -> list[float]:
    slots = [plan.next_slot(fraction, after=start)]
    while len(slots) < count:
        slots.append(plan.next_slot(fraction, after=slots[-1], last=slots[-1]))
    return slots


START = 1781092800.0  # 2026-06-10 12:00 UTC
SUMMER_TIME_EVE = 1774699200.0  # 2026-03-28 12:00 UTC: Berlin's clocks go forward that night


def test_the_slot_is_fixed_by_the_path_and_spreads_workspaces() -> None:
    paths = [Path(f"/home/a/w{n}") for n in range(100)]
    fractions = [slot_fraction(p) for p in paths]
    assert fractions == [slot_fraction(p) for p in paths]
    assert all(0 <= f < 1 for f in fractions)
    plan = schedule(24, "01:00-05:00")
    slots = sorted(plan.next_slot(f, after=START) for f in fractions)
    assert len(set(slots)) == 100
    # Spread over the window: each quarter of it holds some, none holds most.
    quarters = [sum(1 for s in slots if q * 60 <= minutes(s) - 60 < (q + 1) * 60) for q in range(4)]
    assert all(10 <= n <= 40 for n in quarters), quarters


def test_daily_in_the_window() -> None:
    plan = schedule(24, "01:00-05:00")
    slots = runs(plan, 0.5, START, 5)
    assert all(minutes(s) == 3 * 60 for s in slots)  # the middle of the window, every day
    assert [datetime.fromtimestamp(s).day for s in slots] == [11, 12, 13, 14, 15]


def test_a_window_across_midnight() -> None:
    plan = schedule(24, "22:00-04:00")
    slots = runs(plan, 0.75, START, 3)
    assert all(minutes(s) == 2 * 60 + 30 for s in slots)  # 22:00 + 4.5 h
    assert slots[1] - slots[0] == 24 * HOUR


def test_a_night_the_clocks_change_keeps_the_window_in_local_time() -> None:
    for fraction in (0.0, 0.5, 0.99):
        for hours, window in ((24, "01:00-05:00"), (1, "01:00-05:00"), (24, "22:00-04:00")):
            plan = schedule(hours, window)
            start, length = plan.window_start, plan.window_minutes
            for slot in runs(plan, fraction, SUMMER_TIME_EVE, 6):
                assert (minutes(slot) - start) % (24 * 60) < length, (window, fraction)


def test_an_interval_shorter_than_the_window_repeats_inside_it() -> None:
    plan = schedule(1, "01:00-05:00")
    slots = runs(plan, 0.25, START, 8)
    assert [minutes(s) for s in slots] == [75, 135, 195, 255] * 2


def test_an_interval_of_days_skips_days() -> None:
    plan = schedule(48, "01:00-05:00")
    slots = runs(plan, 0.1, START, 3)
    days = [datetime.fromtimestamp(s).toordinal() for s in slots]
    assert [b - a for a, b in itertools.pairwise(days)] == [2, 2]


def test_without_a_window_at_any_time_of_day() -> None:
    plan = schedule(6)
    slots = runs(plan, 0.5, START, 8)
    assert sorted({minutes(s) for s in slots}) == [180, 540, 900, 1260]
    plan = schedule(0.0005)
    slots = runs(plan, 0.5, START, 3)
    assert [round(b - a, 6) for a, b in itertools.pairwise(slots)] == [1.8, 1.8]


def test_off_and_bad_settings() -> None:
    assert VerifySchedule.of(DaemonSettings(verify_interval_hours=0)) is None
    assert parse_config({"daemon": {"verify_interval_hours": 0}}).daemon.verify_interval_hours == 0
    assert parse_config({"daemon": {"verify_window": "00:00-24:00"}}).daemon.verify_window
    for window in ("1:00-5:00", "05:00-05:00", "24:00-01:00", "01:60-02:00", "night"):
        with pytest.raises(ConfigError, match=r"daemon\.verify_window must be a time window"):
            parse_config({"daemon": {"verify_window": window}})
    with pytest.raises(ConfigError, match=r"daemon\.verify_interval_hours must be >= 0"):
        parse_config({"daemon": {"verify_interval_hours": -1}})
    with pytest.raises(ConfigError, match="verify_repair has the wrong type"):
        parse_config({"daemon": {"verify_repair": "yes"}})
