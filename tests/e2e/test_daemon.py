"""acode-syncd end to end: the real daemon as a child process, real signals, a real
NOTIFY_SOCKET and watchdog, real PostgreSQL, /metrics over HTTP. No mocks.

Every wait is for an event with a generous timeout; nothing asserts on speed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote, urlsplit, urlunsplit

import anyio
import pytest

import acode_sync
from acode_sync.config import PostgresSettings
from acode_sync.domain import Session, SessionEvent
from acode_sync.migrations import latest_version, load_migrations
from acode_sync.postgres import PostgresTarget
from acode_sync.store import WorkspaceDatabase
from acode_sync.workspace import database_path
from tests.daemon_harness import (
    ACODE,
    SYNCD,
    DaemonProcess,
    NotifySocket,
    daemon_config,
    forwarder,
    free_port,
    outbox_counts,
    pg_applied,
    pg_count,
    pg_execute,
    pg_fetchval,
    run_cli,
    sample,
    save_sessions,
    scrape,
    seed_sessions,
    wait_until,
    write_config,
)
from tests.integration.test_health import get
from tests.pg import AUDIT_TABLE, install_audit
from tests.records import run_sql

pytestmark = [pytest.mark.postgres, pytest.mark.processes]

# A test value (trust auth ignores it) with every character a URL's parser could take for
# a delimiter: it reaches the DSN percent-encoded, and must appear nowhere either way.
PASSWORD: Final = "Zebra/Pa55#9931?x@y:[z]%é"
DRAIN_RECORDS: Final = 20_000


@dataclass
class Rig:
    """One test's daemon set-up: a root of workspaces, a config file, a notify socket."""

    tmp_path: Path
    pg_url: str
    notify: NotifySocket
    root: Path
    state_dir: Path
    port: int
    config_path: Path
    daemons: list[DaemonProcess] = field(default_factory=list)

    def config(self, roots: list[Path] | None = None, **sections: Any) -> dict[str, Any]:
        return daemon_config(
            dsn=sections.pop("dsn", self.pg_url),
            roots=roots or [self.root],
            state_dir=self.state_dir,
            metrics_port=self.port,
            **sections,
        )

    def write(self, config: dict[str, Any]) -> Path:
        return write_config(self.config_path, config)

    def start(self, config: dict[str, Any] | None = None, name: str = "daemon") -> DaemonProcess:
        self.write(config or self.config())
        daemon = DaemonProcess.start(
            self.config_path, notify=self.notify, workdir=self.tmp_path, name=name
        )
        self.daemons.append(daemon)
        return daemon

    def start_ready(
        self, config: dict[str, Any] | None = None, name: str = "daemon"
    ) -> tuple[DaemonProcess, int]:
        """Start a daemon and wait for its READY=1; (daemon, that datagram's index)."""
        mark = len(self.notify.messages)
        daemon = self.start(config, name)
        return daemon, self.notify.wait_for("READY=1", start=mark)

    def metrics(self) -> str:
        return scrape(self.port)

    def status_file(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads((self.state_dir / "status.json").read_text())
        return loaded

    def sessions(self) -> int:
        return pg_count(self.pg_url, "sessions")

    def wait_sessions(self, count: int) -> None:
        wait_until(lambda: self.sessions() == count, f"{count} sessions in PostgreSQL")

    def stop(self, daemon: DaemonProcess) -> int:
        daemon.signal(signal.SIGTERM)
        return daemon.wait(30)


@pytest.fixture
def rig(tmp_path: Path, pg_url: str) -> Iterator[Rig]:
    tmp_path = tmp_path.resolve()
    root = tmp_path / "root"
    root.mkdir()
    with NotifySocket() as notify:
        rig = Rig(
            tmp_path=tmp_path,
            pg_url=pg_url,
            notify=notify,
            root=root,
            state_dir=tmp_path / "state",
            port=free_port(),
            config_path=tmp_path / "acode-syncd.toml",
        )
        try:
            yield rig
        finally:
            for daemon in rig.daemons:
                daemon.close()


def with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    user, _, host = parts.netloc.rpartition("@")
    password = quote(password, safe="")
    return urlunsplit(parts._replace(netloc=f"{user or 'postgres'}:{password}@{host}"))


def with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    user, at, _ = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{user}{at}127.0.0.1:{port}"))


# --------------------------------------------------------------------------- 1


def test_ready_watchdog_and_wake_up_on_write(rig: Rig) -> None:
    first = rig.root / "alpha"
    save_sessions(first, 3)
    # An idle sweep far beyond every wait below: only inotify can wake the worker.
    daemon, ready = rig.start_ready(
        rig.config(daemon={"sweep_seconds": 300.0, "log_level": "debug"})
    )

    ready_lines = rig.notify.messages[ready].split("\n")
    assert ready_lines[0] == "READY=1"
    assert any(line.startswith("STATUS=1 workspaces (0 broken)") for line in ready_lines)
    # READY=1 comes after the metrics listener and the workers: both are there already.
    assert sample(rig.metrics(), "acode_sync_build_info", version=acode_sync.__version__) == 1
    assert daemon.find("workspace added", workspace=str(first))

    rig.wait_sessions(3)
    rig.notify.wait_count("WATCHDOG=1", 5, start=ready)

    # Another process (this one) writes: the daemon wakes up on inotify, no signal sent.
    daemon.wait_log("batch", records=3)
    db = WorkspaceDatabase(first)
    try:
        session_id = db.save(Session(title="woken")).session_id
        db.save(SessionEvent(session_id=session_id, event_type="message", payload={"n": 1}))
    finally:
        db.close()
    rig.wait_sessions(4)
    wait_until(lambda: pg_count(rig.pg_url, "session_events") == 1, "the event in PostgreSQL")

    # A workspace created under the root after start is found and synced, no restart.
    later = len(rig.notify.messages)
    second = rig.root / "nested" / "beta"
    save_sessions(second, 4)
    rig.wait_sessions(8)
    daemon.wait_log("workspace added", workspace=str(second))
    wait_until(
        lambda: sample(rig.metrics(), "acode_sync_workspaces") == 2, "acode_sync_workspaces 2"
    )
    rig.notify.wait_count("WATCHDOG=1", 3, start=later)  # still pinging

    mark = len(rig.notify.messages)
    assert rig.stop(daemon) == 0
    rig.notify.wait_for("STOPPING=1", start=mark)
    assert daemon.find("stopped")
    assert not (rig.state_dir / "status.json").exists()
    daemon.assert_no_traceback()


# --------------------------------------------------------------------------- 2


def test_reload_on_sighup_and_with_the_reload_command(rig: Rig) -> None:
    save_sessions(rig.root / "one", 2)
    other_root = rig.tmp_path / "other-root"
    save_sessions(other_root / "two", 3)
    daemon, _ = rig.start_ready()
    rig.wait_sessions(2)

    # SIGHUP with a second root: RELOADING=1, then READY=1, and the new root syncs.
    rig.write(rig.config(roots=[rig.root, other_root]))
    mark = len(rig.notify.messages)
    daemon.signal(signal.SIGHUP)
    reloading = rig.notify.wait_for("RELOADING=1", start=mark)
    rig.notify.wait_for("READY=1", start=reloading + 1)
    daemon.wait_log("configuration reloaded", workspaces=2)
    rig.wait_sessions(5)

    # `acode-syncd reload` signals the daemon and reports its answer.
    result = run_cli(SYNCD, "reload", "--config", str(rig.config_path))
    assert (result.returncode, result.stdout) == (0, "configuration reloaded\n"), result.stderr

    # An invalid configuration: the daemon says no, keeps the old one, keeps syncing.
    invalid = rig.config(roots=[rig.root, other_root], postgres={"pool_max": 0})
    rig.write(invalid)
    mark = len(rig.notify.messages)
    daemon.signal(signal.SIGHUP)
    reloading = rig.notify.wait_for("RELOADING=1", start=mark)
    rig.notify.wait_for("READY=1", start=reloading + 1)
    rejected = daemon.wait_log("reload rejected: keeping the old configuration")
    assert rejected["code"] == "ACODE-DB-007"
    assert "postgres.pool_max" in rejected["error"]
    wait_until(lambda: rig.status_file()["reload"]["ok"] is False, "the rejection in status")
    assert "postgres.pool_max" in rig.status_file()["reload"]["error"]
    metrics = rig.metrics()
    assert sample(metrics, "acode_sync_config_reloads_total", result="failure") == 1
    assert sample(metrics, "acode_sync_config_reloads_total", result="success") == 2

    save_sessions(rig.root / "one", 2, title="after the rejected reload")
    save_sessions(other_root / "two", 1, title="after the rejected reload")
    rig.wait_sessions(8)

    result = run_cli(SYNCD, "reload", "--config", str(rig.config_path))
    assert result.returncode == 78, (result.stdout, result.stderr)
    assert result.stderr.startswith("ACODE-DB-007:")
    assert "postgres.pool_max" in result.stderr
    assert daemon.running()

    assert rig.stop(daemon) == 0
    daemon.assert_no_traceback()


# --------------------------------------------------------------------------- 3


def _migrate_postgres(url: str) -> None:
    async def migrate() -> None:
        target = PostgresTarget(PostgresSettings(dsn=url))
        try:
            await target.ensure_schema()
        finally:
            await target.close()

    anyio.run(migrate)


def test_sigterm_during_a_large_drain_then_a_restart_finishes(rig: Rig) -> None:
    _migrate_postgres(rig.pg_url)
    anyio.run(install_audit, rig.pg_url)
    workspace = rig.root / "big"
    seed_sessions(workspace, DRAIN_RECORDS)
    config = rig.config(sync={"batch_max_records": 200})

    daemon, _ = rig.start_ready(config)
    wait_until(lambda: pg_applied(rig.pg_url) > 0, "the first batch", interval=0.02)
    mark = len(rig.notify.messages)
    assert rig.stop(daemon) == 0
    rig.notify.wait_for("STOPPING=1", start=mark)
    assert daemon.find("stopped")
    assert not daemon.find("drain abandoned: in-flight batches were rolled back")

    # Stopped mid-drain, and every batch PostgreSQL committed was marked in SQLite.
    applied = pg_applied(rig.pg_url)
    assert 0 < applied < DRAIN_RECORDS
    assert outbox_counts(workspace).get("processed", 0) == applied

    # Polling the outbox from this process while the daemon drains also guards against
    # the daemon dropping its own SQLite locks (its rescan used to open and close every
    # workspace.db): our connection's close then deleted the WAL under the daemon, its
    # marks were lost and the restarted daemon sent batches twice.
    restarted, _ = rig.start_ready(config, name="restarted")
    wait_until(
        lambda: outbox_counts(workspace) == {"processed": DRAIN_RECORDS},
        "every record processed",
        timeout=60,
    )
    assert pg_applied(rig.pg_url) == DRAIN_RECORDS
    assert rig.sessions() == DRAIN_RECORDS
    assert pg_fetchval(rig.pg_url, f"SELECT count(*) FROM {AUDIT_TABLE}") == DRAIN_RECORDS
    distinct = f"SELECT count(DISTINCT idempotency_key) FROM {AUDIT_TABLE}"
    assert pg_fetchval(rig.pg_url, distinct) == DRAIN_RECORDS
    assert not restarted.find("duplicate")
    assert rig.stop(restarted) == 0
    daemon.assert_no_traceback()
    restarted.assert_no_traceback()


# --------------------------------------------------------------------------- 4


def _outbox_total(workspace: Path) -> int:
    return sum(outbox_counts(workspace).values())


def test_metrics_count_what_was_synced(rig: Rig) -> None:
    workspaces = [rig.root / "w1", rig.root / "w2", rig.root / "group" / "w3"]
    for n, workspace in enumerate(workspaces, start=2):
        save_sessions(workspace, n)
    records = sum(_outbox_total(w) for w in workspaces)
    daemon, _ = rig.start_ready()
    rig.wait_sessions(records)

    def drained() -> str | None:
        text = rig.metrics()
        done = sample(text, "acode_sync_records_total", result="applied") == records
        return text if done and sample(text, "acode_sync_backlog_records") == 0 else None

    text = wait_until(drained, "the drain in /metrics")
    assert sample(text, "acode_sync_workspaces") == len(workspaces)
    assert sample(text, "acode_sync_postgres_up") == 1
    assert sample(text, "acode_sync_records_total", result="duplicate") == 0
    assert sample(text, "acode_sync_records_total", result="conflict") == 0
    assert sample(text, "acode_sync_dead_letters_total") == 0
    assert sample(text, "acode_sync_lag_seconds") == 0
    batches = sample(text, "acode_sync_batch_duration_seconds_count")
    assert batches is not None
    assert batches >= len(workspaces)
    last_success = sample(text, "acode_sync_last_success_timestamp_seconds")
    assert last_success is not None
    assert last_success > 0
    assert sample(text, "acode_sync_config_reloads_total", result="failure") == 0
    assert all(outbox_counts(w) == {"processed": _outbox_total(w)} for w in workspaces)
    assert rig.stop(daemon) == 0


def test_metrics_pass_promtool(rig: Rig) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: the prometheus package)")
    save_sessions(rig.root / "w", 2)
    daemon, _ = rig.start_ready()
    rig.wait_sessions(2)
    text = rig.metrics()
    checked = subprocess.run(
        [promtool, "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert rig.stop(daemon) == 0


# --------------------------------------------------------------------------- 5


def test_postgres_down_at_start_then_sigusr1_drains(rig: Rig) -> None:
    port = free_port()  # nothing listens there until the forwarder starts
    workspace = rig.root / "waiting"
    save_sessions(workspace, 3)
    config = rig.config(
        dsn=with_port(rig.pg_url, port),
        postgres={"connect_timeout": 2.0},
        # Without SIGUSR1 the first retry would come 60-120 s later: past every wait here.
        sync={"outage_base_seconds": 120.0, "outage_cap_seconds": 600.0},
    )
    with forwarder(port) as forward:
        daemon, ready = rig.start_ready(config)
        unavailable = daemon.wait_log("postgres unavailable")
        assert unavailable["code"] == "ACODE-DB-005"
        mark = len(rig.notify.messages)
        rig.notify.wait_count("WATCHDOG=1", 5, start=mark)
        status = rig.notify.wait_for("PostgreSQL down", start=ready)
        assert rig.notify.messages[status].startswith("STATUS=1 workspaces (0 broken)")
        text = rig.metrics()
        assert sample(text, "acode_sync_postgres_up") == 0
        batch_errors = sample(text, "acode_sync_batch_errors_total")
        assert batch_errors is not None
        assert batch_errors >= 1
        wait_until(lambda: rig.status_file()["postgres_up"] is False, "postgres_up false")
        assert outbox_counts(workspace) == {"pending": 3}

        forward.start()
        daemon.signal(signal.SIGUSR1)
        daemon.wait_log("syncing every workspace now", signal="SIGUSR1")
        rig.wait_sessions(3)
        daemon.wait_log("postgres reachable again")
        wait_until(lambda: sample(rig.metrics(), "acode_sync_postgres_up") == 1, "postgres_up 1")
        assert outbox_counts(workspace) == {"processed": 3}
        assert rig.stop(daemon) == 0
    daemon.assert_no_traceback()
    assert rig.notify.count("READY=1", start=ready) == 1


def test_backlog_and_lag_are_reported_during_an_outage(rig: Rig) -> None:
    save_sessions(rig.root / "waiting", 3)
    config = rig.config(
        dsn=with_port(rig.pg_url, free_port()),  # nothing listens there
        sync={"outage_base_seconds": 120.0, "outage_cap_seconds": 600.0},
    )
    daemon, _ = rig.start_ready(config)
    daemon.wait_log("postgres unavailable")

    def reported() -> bool:
        text = rig.metrics()
        lag = sample(text, "acode_sync_lag_seconds")
        return sample(text, "acode_sync_backlog_records") == 3 and lag is not None and lag > 0

    # The status loop refreshes every 2 s: a few rounds are plenty.
    wait_until(reported, "backlog 3 and a lag in /metrics", timeout=8)
    rig.notify.wait_for("backlog 3, PostgreSQL down", timeout=1)
    assert rig.stop(daemon) == 0


def test_a_read_only_server_is_a_named_refusal_that_heals_by_itself(rig: Rig) -> None:
    """A failover that leaves the DSN on a standby: the server answers and refuses every
    write. The daemon says so and charges nothing; fixed, everything ships."""
    _migrate_postgres(rig.pg_url)  # its pool closed: nothing left for the GC to warn about
    role = "acode_e2e_" + random.Random().randbytes(4).hex()
    pg_execute(
        rig.pg_url,
        f"CREATE ROLE {role} LOGIN; GRANT USAGE ON SCHEMA acode TO {role}; "
        f"GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA acode TO {role}; "
        f"ALTER ROLE {role} SET default_transaction_read_only = on",
    )
    try:
        save_sessions(rig.root / "w", 5)
        dsn = rig.pg_url.replace("postgres@", f"{role}@", 1)
        sync = {"outage_base_seconds": 0.2, "outage_cap_seconds": 0.5, "max_attempts": 2}
        daemon, _ = rig.start_ready(rig.config(dsn=dsn, sync=sync))
        refused = daemon.wait_log("postgres refused")
        assert "SQLSTATE 25006" in refused["error"]
        wait_until(
            lambda: sample(rig.metrics(), "acode_sync_postgres_refusing", sqlstate="25006") == 1,
            "the refusing gauge",
        )
        assert sample(rig.metrics(), "acode_sync_postgres_up") == 0
        assert get(rig.port, "/readyz")[1]["reason"] == (
            "PostgreSQL refuses the work (SQLSTATE 25006)"
        )
        wait_until(lambda: len(daemon.find("postgres refused")) >= 6, "six refused turns")
        wait_until(
            lambda: rig.status_file()["postgres_refused_sqlstate"] == "25006",
            "the refusal in status.json",
        )
        attempts = "SELECT count(*) FROM outbox WHERE attempts > 0 OR state <> 'pending'"
        conn = sqlite3.connect(database_path(rig.root / "w"))
        assert conn.execute(attempts).fetchone()[0] == 0
        conn.close()
        pg_execute(rig.pg_url, f"ALTER ROLE {role} RESET default_transaction_read_only")
        rig.wait_sessions(5)
        wait_until(
            lambda: sample(rig.metrics(), "acode_sync_postgres_refusing", sqlstate="25006") is None,
            "the refusing series gone",
        )
        assert sample(rig.metrics(), "acode_sync_postgres_up") == 1
        assert rig.stop(daemon) == 0
        daemon.assert_no_traceback()
    finally:
        for daemon in rig.daemons:
            daemon.close()
        pg_execute(rig.pg_url, f"DROP OWNED BY {role}; DROP ROLE {role}")


# --------------------------------------------------------------------------- 6


def _garbage_workspace(workspace: Path) -> None:
    """A SQLite header followed by garbage pages."""
    (workspace / ".agent").mkdir(parents=True, mode=0o700)
    noise = random.Random(7).randbytes(4096 * 4)
    database_path(workspace).write_bytes(b"SQLite format 3\x00" + noise)


def _future_workspace(workspace: Path) -> None:
    """A workspace whose schema_migrations says version 99."""
    save_sessions(workspace, 1)
    conn = sqlite3.connect(database_path(workspace))
    try:
        conn.execute(
            "INSERT INTO schema_migrations (version, name, checksum, created_at) "
            "VALUES (99, 'future', 'x', '2030-01-01T00:00:00.000000Z')"
        )
        conn.commit()
    finally:
        conn.close()


def test_broken_workspaces_beside_a_healthy_one(rig: Rig) -> None:
    healthy, garbage, future = rig.root / "healthy", rig.root / "garbage", rig.root / "future"
    save_sessions(healthy, 2)
    _garbage_workspace(garbage)
    _future_workspace(future)
    daemon, _ = rig.start_ready()

    not_a_database = daemon.wait_log("workspace broken", workspace=str(garbage))
    assert not_a_database["code"] == "ACODE-DB-001"
    too_new = daemon.wait_log("workspace broken", workspace=str(future))
    assert too_new["code"] == "ACODE-DB-003"
    rig.wait_sessions(2)

    def broken_metrics() -> str | None:
        text = rig.metrics()
        counts = [
            sample(text, "acode_sync_workspaces_broken", code=code)
            for code in ("ACODE-DB-001", "ACODE-DB-003")
        ]
        return text if counts == [1, 1] else None

    text = wait_until(broken_metrics, "acode_sync_workspaces_broken by code")
    assert (
        sample(text, "acode_sync_workspace_broken", workspace=str(garbage), code="ACODE-DB-001")
        == 1
    )
    assert (
        sample(text, "acode_sync_workspace_broken", workspace=str(future), code="ACODE-DB-003") == 1
    )
    assert sample(text, "acode_sync_workspace_broken", workspace=str(healthy), code="") is None
    assert sample(text, "acode_sync_workspaces") == 3
    rig.notify.wait_for("STATUS=3 workspaces (2 broken)")
    wait_until(
        lambda: rig.status_file()["workspace_status"][str(garbage)]["broken"] == "ACODE-DB-001",
        "the broken workspace in status.json",
    )

    save_sessions(healthy, 3, title="still syncing")
    rig.wait_sessions(5)
    assert outbox_counts(healthy) == {"processed": 5}
    assert rig.stop(daemon) == 0
    daemon.assert_no_traceback()


def test_a_workspace_found_before_its_schema_is_not_broken(rig: Rig) -> None:
    """An agent's new database file exists before the transaction creating its schema
    commits: a daemon that finds it in between waits for the schema."""
    workspace = rig.root / "new"
    (workspace / ".agent").mkdir(parents=True, mode=0o700)
    # As the agent leaves it before its schema's transaction commits: WAL on, no table.
    assert run_sql(workspace, "PRAGMA journal_mode = WAL") == [("wal",)]
    daemon, _ = rig.start_ready()
    seen = daemon.wait_log("workspace has no schema yet", workspace=str(workspace))
    assert seen["error"].endswith("no schema yet (schema version 0), this syncer needs " + str(
        latest_version(load_migrations("sqlite"))))  # fmt: skip
    save_sessions(workspace, 2)  # the agent creates the schema, then saves
    rig.wait_sessions(2)
    assert outbox_counts(workspace) == {"processed": 2}
    assert daemon.find("workspace broken") == []
    assert sample(rig.metrics(), "acode_sync_workspaces_broken", code="ACODE-DB-003") in (None, 0)
    assert rig.stop(daemon) == 0
    daemon.assert_no_traceback()


# --------------------------------------------------------------------------- 7


def test_check_config_hides_the_password_and_names_a_bad_key(tmp_path: Path) -> None:
    dsn = with_password("postgresql://postgres@127.0.0.1:5432/db", PASSWORD)
    good = write_config(tmp_path / "good.toml", {"postgres": {"dsn": dsn}})
    result = run_cli(SYNCD, "check-config", "--config", str(good))
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["postgres"]["password"] == "********"
    assert shown["postgres"]["dsn"] == "postgresql://postgres@127.0.0.1:5432/db"
    assert PASSWORD not in result.stdout + result.stderr

    bad = write_config(
        tmp_path / "bad.toml", {"postgres": {"dsn": dsn}, "daemon": {"no_such_key": 1}}
    )
    for command in ("check-config", "run"):
        result = run_cli(SYNCD, command, "--config", str(bad))
        assert result.returncode == 78, (command, result.stdout, result.stderr)
        assert result.stderr.startswith("ACODE-DB-007:"), result.stderr
        assert "daemon.no_such_key" in result.stderr
        assert PASSWORD not in result.stdout + result.stderr


# --------------------------------------------------------------------------- 8


def test_the_password_appears_nowhere(rig: Rig) -> None:
    dsn = with_password(rig.pg_url, PASSWORD)
    config = rig.config(dsn=dsn, daemon={"log_level": "debug"})
    save_sessions(rig.root / "w", 3)
    _garbage_workspace(rig.root / "broken")
    daemon, _ = rig.start_ready(config)
    rig.wait_sessions(3)
    daemon.wait_log("workspace broken")

    # A reload rejected while the file still holds the password in its DSN.
    rig.write(rig.config(dsn=dsn, postgres={"pool_max": 0}))
    daemon.signal(signal.SIGHUP)
    daemon.wait_log("reload rejected: keeping the old configuration")
    rig.write(config)
    reload = run_cli(SYNCD, "reload", "--config", str(rig.config_path))
    assert reload.returncode == 0, reload.stderr
    wait_until(lambda: rig.status_file()["reload"]["ok"] is True, "the reload in status")

    status = (rig.state_dir / "status.json").read_text()
    metrics = rig.metrics()
    db_status = run_cli(
        ACODE, "db", "status", "--workspace", str(rig.root / "w"), "--config", str(rig.config_path)
    )
    assert db_status.returncode == 0, db_status.stderr
    assert "PostgreSQL 127.0.0.1:" in db_status.stdout
    assert rig.stop(daemon) == 0
    assert daemon.find("ready")
    places = {
        "stdout": daemon.stdout(),
        "stderr": daemon.stderr(),
        "status.json": status,
        "/metrics": metrics,
        "NOTIFY datagrams": "\n".join(rig.notify.messages),
        "acode-syncd reload": reload.stdout + reload.stderr,
        "acode db status": db_status.stdout + db_status.stderr,
    }
    assert all(text for name, text in places.items() if name not in ("stderr",))
    shown = (PASSWORD, quote(PASSWORD, safe=""), quote(PASSWORD), json.dumps(PASSWORD)[1:-1])
    leaks = [name for name, text in places.items() if any(form in text for form in shown)]
    assert leaks == []


# --------------------------------------------------------------------------- 9


def test_acode_db_status_shows_the_daemons_view(rig: Rig) -> None:
    watched = rig.root / "w"
    save_sessions(watched, 2)
    elsewhere = rig.tmp_path / "elsewhere"
    save_sessions(elsewhere, 1)
    daemon, _ = rig.start_ready()
    rig.wait_sessions(2)
    wait_until(
        lambda: rig.status_file()["workspace_status"][str(watched)]["last_sync"],
        "the sync in status.json",
    )

    def status(workspace: Path, *flags: str) -> str:
        argv = ["db", "status", "--workspace", str(workspace), "--config", str(rig.config_path)]
        result = run_cli(ACODE, *argv, *flags)
        assert result.returncode == 0, result.stderr
        return result.stdout

    view = json.loads(status(watched, "--json"))["daemon"]
    assert view["pid"] == daemon.pid
    assert view["watching_this_workspace"] is True
    assert view["postgres_up"] is True
    assert view["last_sync"] is not None
    assert view["broken"] is None
    assert f"daemon:          pid {daemon.pid}, watching this workspace" in status(watched)
    assert json.loads(status(elsewhere, "--json"))["daemon"]["watching_this_workspace"] is False

    assert rig.stop(daemon) == 0
    assert json.loads(status(watched, "--json"))["daemon"] is None
    assert "daemon:          not running" in status(watched)


def test_linked_and_foreign_workspaces_are_refused_and_aliases_synced_once(rig: Rig) -> None:
    """A root listed twice and by a symbolic link, a workspace whose `.agent` is a link to
    another's, and (as root) one owned by another user: one workspace is synced, once; the
    refused ones are logged once each and listed in status.json, which is private."""
    healthy = rig.root / "healthy"
    save_sessions(healthy, 2)
    linked = rig.root / "linked"
    linked.mkdir()
    (linked / ".agent").symlink_to(healthy / ".agent")
    refused = {str(linked): f"ACODE-DB-001: {linked}/.agent is a symbolic link"}
    if os.geteuid() == 0:
        foreign = rig.root / "foreign"
        save_sessions(foreign, 1)
        os.chown(foreign / ".agent", 65534, 65534)
        refused[str(foreign)] = f"ACODE-DB-001: {foreign}/.agent is owned by uid 65534, not uid 0"
    (rig.tmp_path / "root-link").symlink_to(rig.root)
    roots = [rig.root, rig.tmp_path / "root-link", rig.root]
    daemon, _ = rig.start_ready(rig.config(roots=roots))
    rig.wait_sessions(2)
    wait_until(lambda: rig.status_file()["refused"] == refused, "the refused workspaces")
    status = rig.status_file()
    assert list(status["workspace_status"]) == [str(healthy)]
    assert stat.S_IMODE((rig.state_dir / "status.json").stat().st_mode) == 0o600
    time.sleep(2.0)  # four more rescans (rescan_seconds 0.5)
    for workspace, line in refused.items():
        logged = daemon.find("workspace refused", workspace=workspace)
        assert len(logged) == 1, logged
        assert f"{logged[0]['code']}: {logged[0]['error']}" == line
    assert len(daemon.find("workspace added")) == 1
    assert rig.stop(daemon) == 0
    daemon.assert_no_traceback()
