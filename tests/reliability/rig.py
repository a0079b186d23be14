"""The reliability suite's set-up: real `acode-syncd` processes, load generator processes,
a PostgreSQL database with the audit trigger, and the checker at the end.

Every DSN carries SECRET as its password (trust auth ignores it); `assert_no_secret`
checks that it appears in no log, stderr, status file, /metrics or NOTIFY datagram.
"""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import anyio
import pytest

from acode_sync.config import PostgresSettings
from acode_sync.postgres import PostgresTarget
from acode_sync.workspace import database_path
from tests.daemon_harness import (
    DaemonProcess,
    NotifySocket,
    child_env,
    daemon_config,
    free_port,
    scrape,
    wait_until,
    write_config,
)
from tests.pg import install_audit
from tests.reliability import checker, plugin

SECRET: Final = "Rel-Soak-Pw-4417-q"  # a test value: trust auth ignores it
ROOT: Final = Path(__file__).resolve().parents[2]
DRAIN_WAIT: Final = 180.0  # generous: a wait for an event, never a speed check


def with_password(url: str, password: str = SECRET) -> str:
    parts = urlsplit(url)
    user, _, host = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{user or 'postgres'}:{password}@{host}"))


def with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    user, at, _ = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{user}{at}127.0.0.1:{port}"))


async def prepare_postgres(dsn: str) -> None:
    """The acode schema (as the daemon would migrate it) plus the audit trigger."""
    target = PostgresTarget(PostgresSettings(dsn=dsn))
    try:
        await target.ensure_schema()
    finally:
        await target.close()
    await install_audit(dsn)


def outbox_states(workspace: Path) -> dict[str, int]:
    conn = sqlite3.connect(database_path(workspace), timeout=30)
    try:
        return {
            str(state): int(n)
            for state, n in conn.execute("SELECT state, count(*) FROM outbox GROUP BY state")
        }
    finally:
        conn.close()


def max_attempts(workspaces: Iterable[Path]) -> int:
    top = 0
    for workspace in workspaces:
        conn = sqlite3.connect(database_path(workspace), timeout=30)
        try:
            (value,) = conn.execute("SELECT coalesce(max(attempts), 0) FROM outbox").fetchone()
            top = max(top, int(value))
        finally:
            conn.close()
    return top


@dataclass
class Loadgen:
    process: subprocess.Popen[bytes]
    ledger: Path
    stderr: Path

    def wait(self, timeout: float = DRAIN_WAIT) -> int:
        return self.process.wait(timeout)

    def check_ok(self) -> None:
        code = self.wait()
        assert code == 0, self.stderr.read_text()[-3000:]


@dataclass
class Rig:
    tmp_path: Path
    pg_url: str  # with SECRET as its password
    notify: NotifySocket
    state_dir: Path
    port: int
    config_path: Path
    daemons: list[DaemonProcess] = field(default_factory=list)
    loadgens: list[Loadgen] = field(default_factory=list)
    workspaces: list[Path] = field(default_factory=list)
    metrics_seen: list[str] = field(default_factory=list)
    extra_ledgers: list[Path] = field(default_factory=list)

    @property
    def root(self) -> Path:
        return self.tmp_path / "root"

    def config(self, *, dsn: str | None = None, **sections: Any) -> dict[str, Any]:
        sync = {"batch_max_records": 25, "outage_base_seconds": 0.2, "outage_cap_seconds": 1.0}
        return daemon_config(
            dsn=dsn or self.pg_url,
            roots=[self.root],
            state_dir=self.state_dir,
            metrics_port=self.port,
            postgres={"connect_timeout": 2.0, "statement_timeout": 5.0}
            | sections.pop("postgres", {}),
            sync=sync | sections.pop("sync", {}),
            # At debug: each `duplicate` line is a resend the checker counts.
            daemon={"log_level": "debug"} | sections.pop("daemon", {}),
        )

    def start_daemon(self, config: dict[str, Any] | None = None) -> DaemonProcess:
        write_config(self.config_path, config or self.config())
        daemon = DaemonProcess.start(
            self.config_path,
            notify=self.notify,
            workdir=self.tmp_path,
            name=f"daemon-{len(self.daemons)}",
        )
        self.daemons.append(daemon)
        return daemon

    def wait_ready(self, mark: int) -> int:
        return self.notify.wait_for("READY=1", start=mark, timeout=60)

    def stop_daemon(self, daemon: DaemonProcess) -> None:
        if daemon.running():
            with contextlib.suppress(Exception):
                self.metrics_seen.append(scrape(self.port))
            daemon.signal(signal.SIGTERM)
            assert daemon.wait(60) == 0, daemon.stderr()[-3000:]

    def workspace(self, name: str) -> Path:
        path = self.root / name
        self.workspaces.append(path)
        return path

    def loadgen(self, workspaces: Sequence[Path], *args: str, name: str = "") -> Loadgen:
        number = len(self.loadgens)
        ledger = self.tmp_path / f"ledger-{number}{name}.jsonl"
        stderr = self.tmp_path / f"loadgen-{number}{name}.stderr"
        with stderr.open("wb") as err:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.reliability.loadgen",
                    "--ledger",
                    str(ledger),
                    "--seed",
                    str(number),
                    *args,
                    *map(str, workspaces),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=child_env(),
                cwd=ROOT,
            )
        gen = Loadgen(process, ledger, stderr)
        self.loadgens.append(gen)
        return gen

    def wait_written(self, workspaces: Sequence[Path]) -> None:
        """Until every workspace exists with at least one outbox record."""

        def written() -> bool:
            try:
                return all(database_path(w).exists() and outbox_states(w) for w in workspaces)
            except sqlite3.Error:  # created, not migrated yet
                return False

        wait_until(written, "the load generators' first records", timeout=60)

    def wait_drained(self, workspaces: Sequence[Path] | None = None) -> float:
        """Until no record is pending anywhere; the seconds it took."""
        started = time.monotonic()
        wait_until(
            lambda: all(
                outbox_states(w).get("pending", 0) == 0 for w in workspaces or self.workspaces
            ),
            "every outbox drained",
            timeout=DRAIN_WAIT,
            interval=0.25,
        )
        return time.monotonic() - started

    def check(self, workspaces: Sequence[Path] | None = None) -> checker.Report:
        return checker.check(
            dsn=self.pg_url,
            ledgers=[g.ledger for g in self.loadgens if g.ledger.exists()] + self.extra_ledgers,
            workspaces=workspaces or self.workspaces,
            logs=[d.stdout_path for d in self.daemons],
        )

    def assert_no_secret(self) -> None:
        """The password is nowhere the daemons wrote or said (scenario 7)."""
        places: dict[str, str] = {}
        for daemon in self.daemons:
            places[f"{daemon.stdout_path.name}"] = daemon.stdout()
            places[f"{daemon.stderr_path.name}"] = daemon.stderr()
        for path in self.state_dir.glob("*"):
            places[str(path)] = path.read_text(errors="replace")
        for n, text in enumerate(self.metrics_seen):
            places[f"/metrics #{n}"] = text
        places["NOTIFY datagrams"] = "\n".join(self.notify.messages)
        assert any(places.values())
        leaks = [name for name, text in places.items() if SECRET in text]
        assert leaks == [], leaks

    def close(self) -> None:
        for gen in self.loadgens:
            if gen.process.poll() is None:
                gen.process.kill()
                gen.process.wait(10)
        for daemon in self.daemons:
            daemon.close()


@pytest.fixture
def rig(tmp_path: Path, pg_url: str) -> Iterator[Rig]:
    tmp_path = tmp_path.resolve()
    (tmp_path / "root").mkdir()
    dsn = with_password(pg_url)
    anyio.run(prepare_postgres, dsn)
    with NotifySocket() as notify:
        rig = Rig(
            tmp_path=tmp_path,
            pg_url=dsn,
            notify=notify,
            state_dir=tmp_path / "state",
            port=free_port(),
            config_path=tmp_path / "acode-syncd.toml",
        )
        try:
            yield rig
        finally:
            rig.close()


def summarise(
    fault: str,
    report: checker.Report,
    *,
    runs: int,
    recovery: float | None = None,
) -> None:
    """Add the scenario's row to the printed summary table."""
    plugin.add_row(
        fault=fault,
        runs=runs,
        records=report.ledgered,
        lost=len(report.lost),
        dup=len(report.duplicates),
        wrong=len(report.wrong_winners),
        stuck=len(report.stuck),
        dead=report.dead,
        unledg=len(report.unledgered),
        resends=report.resends,
        recovery_s=recovery if recovery is not None else "",
    )


def assert_clean(report: checker.Report) -> None:
    assert report.clean, report.details()
