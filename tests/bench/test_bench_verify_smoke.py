"""The verify benchmark runs end to end at a tiny size (it works; its timings are not
checked)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.bench.bench_verify import main

pytestmark = [pytest.mark.postgres, pytest.mark.processes]


def test_verify_benchmark_prints_its_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--entities", "300", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for count in (30, 300):
        assert re.search(
            rf"^verify {count} entities: [\d.]+ s, [\d,]+ entities/s, peak RSS \d+ MiB", out, re.M
        ), out
    assert out.count("  baselines: SQLite id scan ") == 2
    assert list(tmp_path.iterdir()) == []
