"""The benchmark runs end to end at a tiny size (CI checks it works, not its timings)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.bench.bench_store import main

FIGURE_LABELS = (
    "get Session by id",
    "list_sessions page of 50, depth 0",
    "list_sessions page of 50, depth 100",
    "thread hop alone (anyio.to_thread, no-op)",
    "save Session update (WorkspaceStore)",
    "save new SessionEvent (WorkspaceStore)",
    "baseline: WorkspaceDatabase.save, same thread",
    "baseline: raw sqlite3, 2 INSERTs + COMMIT",
)
_FIGURES = r"\s+n=20\s+p50=\s*\d+\.\d{3} ms\s+p99=\s*\d+\.\d{3} ms\s+max=\s*\d+\.\d{3} ms"
_TARGET = r"  target p99 <= [\d.]+ ms: (met|MISSED)"


def test_benchmark_prints_every_figure_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--sessions", "200", "--samples", "20", "--page-samples", "20", "--warmup", "2"]
    assert main([*argv, "--dir", str(tmp_path)]) == 0

    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("acode-sync store benchmark: 200 sessions, synchronous=FULL")
    for label in FIGURE_LABELS:
        matching = [line for line in lines if line.startswith(label)]
        assert len(matching) == 1, label
        has_target = not label.startswith(("baseline", "thread hop"))
        pattern = re.escape(label) + _FIGURES + (_TARGET if has_target else "") + "$"
        assert re.fullmatch(pattern, matching[0]), matching[0]
    plans = [line for line in lines if line.startswith("query plan of list_sessions: ")]
    assert plans
    assert list(tmp_path.iterdir()) == []  # the databases were removed
