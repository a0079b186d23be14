"""The benchmark runs end to end at a tiny size (CI checks it works, not its timings)."""

from __future__ import annotations

import re
import shutil
import socket
import struct
import time
from pathlib import Path
from urllib.parse import urlsplit

import anyio
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
    "drain / pgloader",
    "drain / binary COPY",
    "agent save, no syncer, while the baselines load",
)
_RATE_RATIOS_CPU = r"\s+[\d,]+\s+(\d+\.\d\dx|n/a)\s+\d+\.\d\dx\s+\d+\.\d / \d+\.\d µs"
_NO_PGLOADER = "pgloader: not installed (Debian package pgloader), skipped"


def assert_baselines(lines: list[str], first: str, *, pgloader: bool) -> None:
    """The baselines ran on the same records and the comparison has a row for each way."""
    assert (_NO_PGLOADER in lines) is not pgloader
    if pgloader:
        assert any(re.match(r"pgloader: [\d,]+ records in [\d.]+ s", line) for line in lines)
    assert any(re.match(r"binary COPY \(2 connections\): [\d,]+ records", line) for line in lines)
    header = next(i for i, line in enumerate(lines) if line.startswith("same records, same run"))
    ways = [first, *(["pgloader"] if pgloader else []), r"binary COPY \(2 connections\)"]
    for offset, way in enumerate(ways, start=1):
        assert re.fullmatch(way + _RATE_RATIOS_CPU, lines[header + offset]), lines[header + offset]
    copy_row = lines[header + len(ways)]
    assert re.search(r"\s1\.00x\s+\d", copy_row), copy_row  # COPY against itself
    if pgloader:
        assert re.search(r"\s1\.00x\s", lines[header + len(ways) - 1])
    else:
        assert re.match(r".+?\s+[\d,]+\s+n/a\s", lines[header + 1])


def without_pgloader(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A PATH where pgloader cannot be found (the benchmark needs no other program on it)."""
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


@pytest.mark.postgres
@pytest.mark.parametrize("pgloader", [True, False], ids=["with-pgloader", "without-pgloader"])
def test_sync_benchmark_prints_every_figure_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    pgloader: bool,
) -> None:
    if pgloader and shutil.which("pgloader") is None:
        pytest.skip("pgloader is not installed (Debian package pgloader; .ci/run installs it)")
    if not pgloader:
        without_pgloader(monkeypatch, tmp_path)
    bench_dir = tmp_path / "bench"
    argv = ["--records", "300", "--workspaces", "3", "--dir", str(bench_dir)]
    assert sync_main(argv) == 0

    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("acode-sync sync benchmark: 300 records, 3 workspaces")
    for prefix in ("seeded 300 records", "drained ", "CPU during", "verified: ", "naive relay: "):
        assert any(line.startswith(prefix) for line in lines), prefix
    for label in SYNC_FIGURE_LABELS:
        matching = [line for line in lines if line.startswith(f"{label}  ")]
        assert len(matching) == 1, label
        assert re.match(re.escape(label) + r"\s{2,}\S", matching[0]), matching[0]
    assert re.search(r"^records/s\s+[\d,]+$", "\n".join(lines), re.M)
    ratio = r"\s+>= 2x \(1M records, 100 workspaces\): "
    ratio += r"(met|MISSED)$" if pgloader else r"pgloader not run$"
    assert re.search(r"^drain / pgloader\s+(n/a|[\d.]+x)" + ratio, "\n".join(lines), re.M)
    assert re.search(r"^peak RSS\s+[\d.]+ MB", "\n".join(lines), re.M)
    beside = (
        r"^agent save, no syncer, while the baselines load\s+[\d.]+ / [\d.]+ / [\d.]+ ms \(n=\d+\)$"
    )
    assert re.search(beside, "\n".join(lines), re.M)
    assert_baselines(lines, "acode drain", pgloader=pgloader)
    assert re.match(r"naive relay \(own sample\)" + _RATE_RATIOS_CPU, lines[-1]), lines[-1]
    assert list(bench_dir.iterdir()) == []  # the workspaces were removed


@pytest.mark.postgres
def test_sync_benchmark_without_baselines_drains_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--records", "200", "--workspaces", "2", "--no-baselines", "--dir", str(tmp_path)]
    assert sync_main(argv) == 0

    out = capsys.readouterr().out
    assert re.search(r"^records/s\s+[\d,]+", out, re.M)
    for absent in ("pgloader", "binary COPY", "naive relay", "same records, same run"):
        assert absent not in out, absent


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


@pytest.mark.postgres
@pytest.mark.processes
@pytest.mark.parametrize("pgloader", [True, False], ids=["with-pgloader", "without-pgloader"])
def test_daemon_backlog_benchmark_runs_the_baselines(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    pgloader: bool,
) -> None:
    from tests.bench.bench_daemon import main as daemon_main

    if pgloader and shutil.which("pgloader") is None:
        pytest.skip("pgloader is not installed (Debian package pgloader; .ci/run installs it)")
    if not pgloader:
        without_pgloader(monkeypatch, tmp_path)
    daemon_main(["--only", "backlog", "--backlog-records", "300", "--backlog-workspaces", "3"])

    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("backlog: seeded 300 records into 3 workspaces") for line in lines)
    assert any(
        re.match(r"acode-syncd: 300 records from 3 workspaces in [\d.]+ s", line) for line in lines
    )
    assert_baselines(lines, "acode-syncd", pgloader=pgloader)


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def _read_until_ready(sock: socket.socket) -> None:
    """Read PostgreSQL's messages up to ReadyForQuery ('Z')."""
    buffer = b""
    while True:
        while len(buffer) < 5 or len(buffer) < 1 + struct.unpack("!I", buffer[1:5])[0]:
            chunk = sock.recv(65536)
            assert chunk, "the server closed the connection"
            buffer += chunk
        kind, length = buffer[:1], struct.unpack("!I", buffer[1:5])[0]
        assert kind != b"E", buffer[: 1 + length]
        buffer = buffer[1 + length :]
        if kind == b"Z":
            return


@pytest.mark.postgres
def test_backend_cpu_counts_a_backend_first_seen_while_it_starts(pg_url: str) -> None:
    """The postmaster forks a backend when a client connects, before the client names its
    database: a sample taken then must not rule the backend out for good."""
    from tests.bench.baselines import BackendCpu

    url = urlsplit(pg_url)
    backends = anyio.run(BackendCpu.of, pg_url, backend="asyncio")
    with backends, socket.create_connection((url.hostname, url.port or 5432)) as sock:
        time.sleep(0.2)  # the backend is forked and waits for the startup packet
        backends.sample()
        user, database = (url.username or "postgres"), url.path.lstrip("/")
        params = f"user\0{user}\0database\0{database}\0\0".encode()
        startup = struct.pack("!I", 196608) + params  # protocol 3.0
        sock.sendall(struct.pack("!I", len(startup) + 4) + startup)
        _read_until_ready(sock)  # trust authentication, as the tests' server runs
        sock.sendall(_message(b"Q", b"SELECT count(*) FROM generate_series(1, 3000000)\0"))
        _read_until_ready(sock)
        backends.sample()
        sock.sendall(_message(b"X", b""))
    assert len(backends.last) == 1
    assert backends.seconds > 0.05
