"""The benchmark runs end to end at a tiny size (CI checks it works, not its timings)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.bench.bench_store import main
from tests.bench.bench_sync import main as sync_main

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


SYNC_FIGURE_LABELS = (
    "records",
    "workspaces",
    "records/s",
    "batch apply p50 / p99",
    "peak RSS",
    "agent save p50 / p99 / max",
    "  while its own workspace drained",
    "naive relay records/s",
)


@pytest.mark.postgres
def test_sync_benchmark_prints_every_figure_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--records", "300", "--workspaces", "3", "--dir", str(tmp_path)]
    assert sync_main(argv) == 0

    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("acode-sync sync benchmark: 300 records, 3 workspaces")
    for prefix in ("seeded 300 records", "drained ", "CPU during", "verified: ", "naive relay: "):
        assert any(line.startswith(prefix) for line in lines), prefix
    for label in SYNC_FIGURE_LABELS:
        matching = [line for line in lines if line.startswith(f"{label}  ")]
        assert len(matching) == 1, label
        assert re.match(re.escape(label) + r"\s{2,}\S", matching[0]), matching[0]
    assert re.search(r"^records/s\s+[\d,]+\s+>= [\d,]+ .*: (met|MISSED)$", "\n".join(lines), re.M)
    assert re.search(r"^peak RSS\s+[\d.]+ MB", "\n".join(lines), re.M)
    assert list(tmp_path.iterdir()) == []  # the workspaces were removed


@pytest.mark.postgres
@pytest.mark.processes
def test_daemon_benchmark_prints_every_figure_line(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.bench.bench_daemon import main as daemon_main

    daemon_main(["--rate", "50", "--seconds", "2", "--idle-workspaces", "3", "--idle-seconds", "1"])
    out = capsys.readouterr().out
    assert re.search(r"commit -> visible in PostgreSQL, \d+ records at 50/s .*\(0 not seen\)", out)
    for label in ("p50", "p99", "max"):
        assert re.search(rf"^  {label} +[\d.]+ ms", out, re.M), label
    assert re.search(r"^idle, 3 workspaces watched", out, re.M)
    assert re.search(r"^  CPU +[\d.]+ % of one core", out, re.M)
    assert re.search(r"^  RSS +[\d.]+ MB", out, re.M)
    assert re.search(r"^  open files \d+$", out, re.M)
