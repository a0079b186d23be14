"""The growth benchmark runs end to end at a tiny size (CI checks it works, not its
timings): both layouts drained, then the in-place migration timed."""

from __future__ import annotations

import re

import pytest

from tests.bench.bench_growth import main

pytestmark = pytest.mark.postgres


def test_growth_benchmark_prints_both_layouts_and_their_ratio(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--preload", "2000", "--records", "400", "--workspaces", "2"]) == 0
    out = capsys.readouterr().out
    for layout in ("old", "new"):
        assert re.search(rf"{layout}: 400 records in [\d.]+ s = [\d,]+ records/s", out), out
    assert re.search(r"new/old: records/s x[\d.]+, PostgreSQL CPU per record x[\d.]+", out)


def test_growth_benchmark_times_the_in_place_migration(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--preload", "2000", "--migration-only"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"in-place migration of 2,000 entity rows and 2,000 keys from version 5", out)
