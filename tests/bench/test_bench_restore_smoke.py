"""The restore benchmark runs end to end at a tiny size (it works; its timings are not
checked)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.bench.bench_restore import main

pytestmark = [pytest.mark.postgres, pytest.mark.processes]


def test_restore_benchmark_prints_its_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--sessions", "50", "--events", "1", "--dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "acode-sync restore benchmark: 100 entities (50 sessions)"
    assert re.fullmatch(r"baseline: COPY out of the same rows\s+[\d,]+ entities/s", lines[1])
    for entities, line in zip((10, 100), lines[2:4], strict=True):
        assert re.fullmatch(
            rf"restore --all,\s+{entities} entities\s+[\d,]+ entities/s\s+peak RSS\s+\d+ MiB\s+"
            rf"[\d.]+x COPY's rate  \(total: {entities} restored, {entities} verified, 0 skipped\)",
            line,
        ), line
    assert re.fullmatch(r"target >= 20000 entities/s: (met|MISSED)", lines[4])
    assert list(tmp_path.iterdir()) == []
