"""What an operator meets in a running acode-syncd: new workspaces found at once,
shipping resumed as soon as PostgreSQL is back, a true backlog, a quiet log, one daemon
per state directory, and a reload that always reaches the daemon.

Real daemons as child processes, real PostgreSQL (a private cluster where it must be
stopped), real inotify. Each wait bounded by what the behaviour promises.
"""

from __future__ import annotations

import contextlib
import json
import random
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_harness import (
    ACODE,
    SYNCD,
    DaemonProcess,
    child_env,
    daemon_config,
    free_port,
    pg_count,
    pg_execute,
    run_cli,
    sample,
    save_sessions,
    scrape,
    wait_until,
    write_config,
)
from tests.e2e.test_daemon import Rig, rig
from tests.reliability.test_postgres_faults import Cluster, cluster

pytestmark = [pytest.mark.postgres, pytest.mark.processes]
__all__ = ["cluster", "rig"]

# No periodic rescan and no sweep within any test: only the watchers can find and wake.
SLOW_SCANS = {"rescan_seconds": 600.0, "sweep_seconds": 600.0}


@contextlib.contextmanager
def blackhole() -> Iterator[int]:
    """A port whose connections are accepted by the kernel and never answered."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        yield int(sock.getsockname()[1])


def with_port(url: str, port: int) -> str:
    head, _, tail = url.rpartition("@")
    return f"{head}@127.0.0.1:{port}/{tail.partition('/')[2]}"


def test_a_workspace_created_after_start_ships_within_seconds(rig: Rig) -> None:
    daemon, _ = rig.start_ready(rig.config(daemon=SLOW_SCANS))
    # Two levels of new directories, created after start, then the database.
    workspace = rig.root / "team" / "new"
    started = time.monotonic()
    save_sessions(workspace, 3)
    wait_until(lambda: rig.sessions() == 3, "the new workspace's sessions", timeout=5)
    assert time.monotonic() - started < 3
    assert daemon.find("workspace added", workspace=str(workspace))
    assert rig.stop(daemon) == 0
    daemon.assert_no_traceback()


def test_shipping_resumes_within_seconds_of_postgres_return(
    rig: Rig,
    cluster: Cluster,
) -> None:
    url = cluster.dsn()
    # Backoff waits of 15 to 60 s: without the daemon's own probe, nothing would ship
    # for that long after the restart.
    config = rig.config(
        dsn=url,
        postgres={"connect_timeout": 2.0},
        sync={"outage_base_seconds": 30.0, "outage_cap_seconds": 60.0},
        daemon=SLOW_SCANS,
    )
    workspaces = [rig.root / f"w{n}" for n in range(3)]
    for workspace in workspaces:
        save_sessions(workspace, 1)
    daemon, _ = rig.start_ready(config)
    wait_until(lambda: pg_count(url, "sessions") == 3, "the first sessions")

    cluster.stop("immediate")
    for workspace in workspaces:
        save_sessions(workspace, 2, title="during the outage")
    wait_until(lambda: len(daemon.find("postgres unavailable")) >= 3, "every workspace waiting")
    # Written while the workspaces wait out the outage: in the backlog at once.
    for workspace in workspaces:
        save_sessions(workspace, 1, title="while waiting")
    wait_until(
        lambda: sample(rig.metrics(), "acode_sync_backlog_records") == 9,
        "backlog 9 during the outage",
        timeout=4,
    )
    time.sleep(2)  # the outage lasts a while; the probe keeps failing
    assert pg_count(rig.pg_url, "sessions") == 0  # (the shared server is not the cluster)

    cluster.start()
    back = time.monotonic()
    wait_until(lambda: pg_count(url, "sessions") == 12, "the outage's sessions", timeout=10)
    assert time.monotonic() - back < 4
    up = daemon.wait_log("postgres up")
    assert up["resuming_workspaces"] == 3
    assert rig.stop(daemon) == 0
    daemon.assert_no_traceback()


def test_a_refusal_is_not_taken_for_a_recovery(rig: Rig) -> None:
    """A read-only server answers the probe: that must not wake the waiting workspace,
    which keeps its backoff until a batch is applied."""
    role = "acode_e2e_" + random.Random().randbytes(4).hex()
    pg_execute(rig.pg_url, f"CREATE ROLE {role} LOGIN")
    try:
        daemon, _ = rig.start_ready(rig.config())  # creates the schema as the owner
        save_sessions(rig.root / "w", 1)
        rig.wait_sessions(1)
        assert rig.stop(daemon) == 0
        pg_execute(
            rig.pg_url,
            f"GRANT USAGE ON SCHEMA acode TO {role}; "
            f"GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA acode TO {role}; "
            f"ALTER ROLE {role} SET default_transaction_read_only = on",
        )
        save_sessions(rig.root / "w", 2, title="refused")
        dsn = rig.pg_url.replace("postgres@", f"{role}@", 1)
        sync = {"outage_base_seconds": 30.0, "outage_cap_seconds": 60.0}
        daemon, _ = rig.start_ready(rig.config(dsn=dsn, sync=sync, daemon=SLOW_SCANS), "second")
        daemon.wait_log("postgres refused")
        wait_until(lambda: rig.status_file()["postgres_refused_sqlstate"] == "25006", "refused")
        time.sleep(4)  # several outage probe intervals
        assert len(daemon.find("postgres refused")) == 1
        assert not daemon.find("postgres up")
        assert rig.status_file()["postgres_refused_sqlstate"] == "25006"
        assert rig.stop(daemon) == 0
    finally:
        for daemon in rig.daemons:
            daemon.close()
        pg_execute(rig.pg_url, f"DROP OWNED BY {role}; DROP ROLE {role}")


def _backlog_in_status(rig: Rig) -> int | None:
    try:
        return int(rig.status_file()["backlog"])
    except FileNotFoundError:  # not written yet
        return None


def test_backlog_is_true_from_the_moment_a_workspace_is_known(rig: Rig) -> None:
    """PostgreSQL hangs (a connect that is never answered): no turn ends for 60 s, yet
    the backlog of every workspace, old or new, is there at once."""
    save_sessions(rig.root / "a", 4)
    with blackhole() as port:
        config = rig.config(
            dsn=with_port(rig.pg_url, port),
            postgres={"connect_timeout": 60.0},
            daemon=SLOW_SCANS | {"drain_timeout_seconds": 1.0},
        )
        daemon, _ = rig.start_ready(config)

        def backlog(count: int) -> bool:
            return sample(rig.metrics(), "acode_sync_backlog_records") == count

        wait_until(lambda: backlog(4), "backlog 4 in /metrics", timeout=5)
        wait_until(lambda: _backlog_in_status(rig) == 4, "backlog 4 in status", timeout=3)
        save_sessions(rig.root / "b", 2)
        wait_until(lambda: backlog(6), "backlog 6 in /metrics", timeout=5)
        wait_until(lambda: _backlog_in_status(rig) == 6, "backlog 6 in status", timeout=3)
        status = rig.status_file()
        assert status["workspace_status"][str(rig.root / "b")]["backlog"] == 2
        assert status["lag_seconds"] >= 0
        assert rig.stop(daemon) == 0


def _summaries(daemon: DaemonProcess, workspace: Path) -> list[dict[str, Any]]:
    return daemon.find("sync summary", workspace=str(workspace))


def test_per_batch_lines_stay_off_info_and_a_summary_tells_each_interval(rig: Rig) -> None:
    workspace = rig.root / "w"
    save_sessions(workspace, 3)
    daemon, _ = rig.start_ready(rig.config(daemon={"summary_interval_seconds": 1.0}))
    rig.wait_sessions(3)
    first = wait_until(lambda: _summaries(daemon, workspace), "the first summary")
    assert first[0]["level"] == "info"
    assert {k: first[0][k] for k in ("applied", "duplicates", "conflicts", "failed", "dead")} == {
        "applied": 3,
        "duplicates": 0,
        "conflicts": 0,
        "failed": 0,
        "dead": 0,
    }
    assert first[0]["batches"] >= 1

    # A busy interval: one summary however many batches (one per save here).
    for n in range(5):
        save_sessions(workspace, 1, title=f"busy {n}")
    rig.wait_sessions(8)
    wait_until(lambda: len(_summaries(daemon, workspace)) >= 2, "the busy interval's summary")
    time.sleep(1.5)
    busy = _summaries(daemon, workspace)[1:]
    assert sum(line["applied"] for line in busy) == 5

    # An idle interval says nothing.
    seen = len(_summaries(daemon, workspace))
    time.sleep(2.5)
    assert len(_summaries(daemon, workspace)) == seen
    assert daemon.find("batch") == []  # debug only
    assert rig.stop(daemon) == 0
    daemon.assert_no_traceback()


def test_two_daemons_of_one_user_have_their_own_state_and_one_dir_takes_one(rig: Rig) -> None:
    run = rig.tmp_path / "run"
    env = {"XDG_RUNTIME_DIR": str(run)}
    daemons, paths = [], []
    for name in ("alpha", "beta"):
        root = rig.tmp_path / name
        save_sessions(root / "w", 1)
        config = daemon_config(
            dsn=rig.pg_url, roots=[root], state_dir=Path("unused"), metrics_port=free_port()
        )
        del config["daemon"]["state_dir"]  # the default: one per configuration file
        path = write_config(rig.tmp_path / name / "acode-syncd.toml", config)
        mark = len(rig.notify.messages)
        daemon = DaemonProcess.start(
            path, notify=rig.notify, workdir=rig.tmp_path, name=name, extra_env=env
        )
        rig.daemons.append(daemon)
        rig.notify.wait_for("READY=1", start=mark)
        daemons.append(daemon)
        paths.append(path)
    rig.wait_sessions(2)

    def status_files() -> list[Path] | None:
        found = sorted(run.glob("acode-syncd/*/status.json"))
        return found if len(found) == 2 else None

    files = wait_until(status_files, "two status files")
    assert {json.loads(f.read_text())["pid"] for f in files} == {d.pid for d in daemons}
    for daemon, path in zip(daemons, paths, strict=True):
        argv = ["db", "status", "--workspace", str(path.parent / "w"), "--config", str(path)]
        result = run_cli(ACODE, *argv, "--json", env=child_env(**env))
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["daemon"]["pid"] == daemon.pid

    # The same configuration again: the same state directory, refused before anything.
    third = DaemonProcess.start(
        paths[0], notify=rig.notify, workdir=rig.tmp_path, name="third", extra_env=env
    )
    rig.daemons.append(third)
    assert third.wait(20) == 78
    assert f"ACODE-DB-007: another acode-syncd (pid {daemons[0].pid}) already runs" in (
        third.stderr()
    )
    assert daemons[0].running()
    for daemon in daemons:
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(30) == 0


def test_reload_of_an_invalid_file_reaches_the_daemon_and_status_still_finds_it(
    rig: Rig,
) -> None:
    save_sessions(rig.root / "w", 1)
    daemon, _ = rig.start_ready()
    rig.wait_sessions(1)
    rig.write(rig.config(postgres={"pool_max": 0}))  # parses, but is invalid

    result = run_cli(SYNCD, "reload", "--config", str(rig.config_path))
    assert result.returncode == 78, (result.stdout, result.stderr)
    local, answer = result.stderr.splitlines()[:2]
    assert local.startswith("ACODE-DB-007:")
    assert "postgres.pool_max" in local
    assert answer.startswith("reload rejected, old configuration kept: ACODE-DB-007")
    daemon.wait_log("reload rejected: keeping the old configuration")
    text = scrape(rig.port)
    assert sample(text, "acode_sync_config_reloads_total", result="failure") == 1

    argv = ["db", "status", "--workspace", str(rig.root / "w"), "--config", str(rig.config_path)]
    shown = json.loads(run_cli(ACODE, *argv, "--json").stdout)
    assert shown["daemon"]["pid"] == daemon.pid
    assert "postgres.pool_max" in shown["config_error"]
    lines = run_cli(ACODE, *argv).stdout
    assert "config:          invalid: ACODE-DB-007" in lines
    assert f"daemon:          pid {daemon.pid}, watching this workspace" in lines

    save_sessions(rig.root / "w", 1, title="still syncing on the old configuration")
    rig.wait_sessions(2)
    assert rig.stop(daemon) == 0
    result = run_cli(SYNCD, "reload", "--config", str(rig.config_path))
    assert result.returncode == 78  # no daemon: the file's own error
    assert result.stderr.startswith("ACODE-DB-007:")
    daemon.assert_no_traceback()
