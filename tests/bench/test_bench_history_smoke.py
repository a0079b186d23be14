"""The history benchmark runs end to end at a tiny size (it works; no timings checked)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.bench_history import main

pytestmark = pytest.mark.postgres


def test_the_history_benchmark_drains_both_ways_and_checks_the_history(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--records", "400", "--workspaces", "2", "--batch", "50", "--dir", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "round 1: history off: 400 records in" in out
    assert "history empty" in out
    assert "round 1: history  on: 400 records in" in out
    assert "history 400 rows" in out
    assert out.rstrip().splitlines()[-1].startswith("syncer CPU us/record")
    assert list(tmp_path.iterdir()) == []
