"""Scenario 2: PostgreSQL faults. Connections cut mid-batch, blackholed and refused
through the TcpProxy while the daemon drains; a COMMIT whose reply never comes back
(ambiguous commit); a private PostgreSQL cluster stopped with `pg_ctl stop -m immediate`
while the daemon runs, then restarted."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import anyio
import pytest

from acode_sync.config import PostgresSettings, SyncSettings
from acode_sync.errors import PostgresUnavailableError
from acode_sync.postgres import PostgresTarget
from acode_sync.sync import WorkspaceSyncer
from tests.daemon_harness import (
    free_port,
    pg_fetchval,
    records_applied,
    sample,
    scrape,
    wait_until,
)
from tests.faults import AtNth
from tests.pg import AUDIT_TABLE
from tests.proxy import TcpProxy
from tests.reliability import plugin
from tests.reliability.rig import (
    SECRET,
    Rig,
    assert_clean,
    max_attempts,
    outbox_states,
    prepare_postgres,
    rig,
    summarise,
)

pytestmark = [
    pytest.mark.reliability,
    pytest.mark.postgres,
    pytest.mark.processes,
    pytest.mark.timeout(900),
]
__all__ = ["rig"]

PG_BIN: Final = Path("/usr/lib/postgresql/15/bin")


def test_cut_blackhole_and_refused_connections_while_the_daemon_drains(rig: Rig) -> None:
    faults = int(plugin.scaled(8, 80))
    rng = random.Random(faults)
    workspaces = [rig.workspace(f"ws{n}") for n in range(6)]
    stop = rig.tmp_path / "stop"
    rig.loadgen(workspaces[:3], "--stop-file", str(stop), "--pause", "0.01")
    rig.loadgen(workspaces[3:], "--stop-file", str(stop), "--pause", "0.01")
    rig.wait_written(workspaces)
    with TcpProxy() as proxy:
        daemon = rig.start_daemon(rig.config(dsn=proxy.dsn(rig.pg_url)))
        kinds = []
        for _ in range(faults):
            time.sleep(rng.uniform(0.3, 1.2))
            kind = rng.choice(("cut", "blackhole", "down"))
            kinds.append(kind)
            if kind == "cut":
                proxy.cut()  # every live connection reset, mid-batch or idle
            elif kind == "blackhole":
                proxy.blackhole()
                time.sleep(rng.uniform(1.0, 3.0))
                proxy.restore()
            else:
                proxy.down()
                time.sleep(rng.uniform(0.5, 2.0))
                proxy.restore()
        stop.touch()
        for gen in rig.loadgens:
            gen.check_ok()
        recovery = rig.wait_drained()
        rig.stop_daemon(daemon)
    report = rig.check()
    summarise(
        f"proxy faults x{faults} ({', '.join(sorted(set(kinds)))})",
        report,
        runs=faults,
        recovery=recovery,
    )
    print(
        report.line(),
        f"outages seen: {len(daemon.find('postgres unavailable'))},",
        f"max attempts: {max_attempts(workspaces)}",
    )
    assert_clean(report)
    assert report.dead == 0
    daemon.assert_no_traceback()
    rig.assert_no_secret()


async def _ambiguous_commit(workspace: Path, dsn: str, proxy: TcpProxy) -> tuple[int, int]:
    """Drain through the proxy; at the first COMMIT, blackhole: the COMMIT is held (not
    lost) and its reply never comes. The client gives up (an outage); then the held COMMIT
    reaches PostgreSQL, which commits. The next drain resends: duplicates, no double
    effect. Returns (audit rows after the ambiguous commit, duplicates of the resend)."""
    settings = PostgresSettings(dsn=proxy.dsn(dsn), connect_timeout=1.0, statement_timeout=1.0)
    target = PostgresTarget(settings)
    try:
        syncer = WorkspaceSyncer(
            workspace=workspace,
            target=target,
            settings=SyncSettings(batch_max_records=50),
            fault_hook=AtNth("before_commit", 1, proxy.blackhole),
        )
        with pytest.raises(PostgresUnavailableError):
            await syncer.drain()
    finally:
        with anyio.CancelScope(shield=True):
            await target.close()
    assert outbox_states(workspace) == {"pending": 120}  # nothing marked, no attempt used
    proxy.restore()  # the held COMMIT flows on

    async def landed() -> int:
        for _ in range(100):
            count = int(
                await anyio.to_thread.run_sync(
                    pg_fetchval, dsn, f"SELECT count(*) FROM {AUDIT_TABLE}"
                )
                or 0
            )
            if count:
                return count
            await anyio.sleep(0.1)
        return 0

    committed = await landed()
    target = PostgresTarget(PostgresSettings(dsn=dsn))
    try:
        summary = await WorkspaceSyncer(workspace=workspace, target=target).drain()
    finally:
        await target.close()
    return committed, summary.duplicates


def test_a_commit_whose_reply_is_lost_is_resent_as_duplicates(rig: Rig) -> None:
    workspace = rig.workspace("ambiguous")
    rig.loadgen([workspace], "--records", "120").check_ok()
    with TcpProxy() as proxy:
        committed, duplicates = anyio.run(_ambiguous_commit, workspace, rig.pg_url, proxy)
    report = rig.check()
    report.resends = duplicates
    summarise("COMMIT reply lost (ambiguous commit)", report, runs=1)
    assert committed > 0, "the held COMMIT never reached PostgreSQL"
    assert duplicates > 0
    assert_clean(report)
    assert outbox_states(workspace) == {"processed": 120}


async def _cut_mid_batch(workspace: Path, dsn: str, proxy: TcpProxy) -> tuple[int, int]:
    """Drain through the proxy in batches of 30; when the third batch has written all its
    rows but not committed, reset every connection. The first two batches stay applied
    and marked; the cut one rolls back, its records stay pending with no attempt used.
    Returns (records processed after the cut, duplicates of the next drain)."""
    target = PostgresTarget(
        PostgresSettings(dsn=proxy.dsn(dsn), connect_timeout=2.0, statement_timeout=5.0)
    )
    try:
        syncer = WorkspaceSyncer(
            workspace=workspace,
            target=target,
            settings=SyncSettings(batch_max_records=30),
            fault_hook=AtNth("before_commit", 3, proxy.cut),
        )
        with pytest.raises(PostgresUnavailableError):
            await syncer.drain()
    finally:
        with anyio.CancelScope(shield=True):
            await target.close()
    processed = outbox_states(workspace).get("processed", 0)
    target = PostgresTarget(PostgresSettings(dsn=dsn))
    try:
        summary = await WorkspaceSyncer(workspace=workspace, target=target).drain()
    finally:
        await target.close()
    return processed, summary.duplicates


def test_a_connection_cut_mid_batch_rolls_the_batch_back(rig: Rig) -> None:
    workspace = rig.workspace("cut")
    rig.loadgen([workspace], "--records", "120").check_ok()
    with TcpProxy() as proxy:
        processed, duplicates = anyio.run(_cut_mid_batch, workspace, rig.pg_url, proxy)
    assert processed == 60  # the two committed batches, marked; the cut one not
    assert max_attempts([workspace]) == 0
    report = rig.check()
    report.resends = duplicates
    summarise("connection reset mid-batch (before COMMIT)", report, runs=1)
    assert duplicates == 0  # the cut batch rolled back: nothing of it was there
    assert_clean(report)
    assert outbox_states(workspace) == {"processed": 120}


# --------------------------------------------------------------------------- the cluster


class Cluster:
    """A private PostgreSQL cluster owned by the postgres user, on a free port."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="acode-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        shutil.chown(self.dir, "postgres", "postgres")

    def _run(self, *argv: str, timeout: float = 120) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *argv],
            check=True,
            capture_output=True,
            timeout=timeout,
            cwd=self.dir,
        )

    def init(self) -> None:
        self._run(
            str(PG_BIN / "initdb"),
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale",
            "C.UTF-8",
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} "
            "-c shared_buffers=16MB -c max_connections=40"
        )
        self._run(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.dir / "log"),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )

    def stop(self, mode: str = "immediate") -> None:
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def dsn(self) -> str:
        return f"postgresql://postgres:{SECRET}@127.0.0.1:{self.port}/postgres"

    def remove(self) -> None:
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    if os.geteuid() != 0 or shutil.which("runuser") is None or not (PG_BIN / "initdb").exists():
        pytest.skip("needs root, runuser and PostgreSQL 15's initdb to run a private cluster")
    made = Cluster()
    try:
        made.init()
        made.start()
        yield made
    finally:
        made.remove()


def test_postgres_stopped_immediately_then_restarted(rig: Rig, cluster: Cluster) -> None:
    outage = plugin.scaled(5.0, 45.0)
    rig.pg_url = cluster.dsn()
    anyio.run(prepare_postgres, rig.pg_url)
    workspaces = [rig.workspace(f"ws{n}") for n in range(4)]
    stop = rig.tmp_path / "stop"
    rig.loadgen(workspaces, "--stop-file", str(stop), "--pause", "0.01")
    rig.wait_written(workspaces)
    daemon = rig.start_daemon()
    rig.wait_ready(0)
    wait_until(lambda: records_applied(rig.port), "the first batch")

    cluster.stop("immediate")
    down_at = len(rig.notify.messages)
    down_since = time.monotonic()
    daemon.wait_log("postgres unavailable", timeout=60)
    rig.notify.wait_for("PostgreSQL down", start=down_at, timeout=60)
    wait_until(lambda: sample(scrape(rig.port), "acode_sync_postgres_up") == 0, "postgres_up 0")
    time.sleep(max(0.0, outage - (time.monotonic() - down_since)))
    # Still alive, still honest with systemd: watchdog pings kept coming all along.
    assert daemon.running()
    assert rig.notify.count("WATCHDOG=1", start=down_at) >= 3
    rig.metrics_seen.append(scrape(rig.port))
    assert max_attempts(workspaces) == 0  # an outage uses no record's attempts

    cluster.start()
    up_at = time.monotonic()
    stop.touch()
    for gen in rig.loadgens:
        gen.check_ok()
    rig.wait_drained()
    recovery = time.monotonic() - up_at
    daemon.wait_log("postgres reachable again")
    rig.notify.wait_for("PostgreSQL up", start=down_at, timeout=60)
    rig.stop_daemon(daemon)
    assert max_attempts(workspaces) == 0
    report = rig.check()
    summarise(f"pg_ctl stop -m immediate, {outage:g} s outage", report, runs=1, recovery=recovery)
    assert_clean(report)
    assert report.dead == 0
    assert rig.notify.count("READY=1") == 1
    daemon.assert_no_traceback()
    rig.assert_no_secret()
