"""The monitoring files against a real Prometheus scraping a real daemon.

The test starts Debian's Prometheus (/usr/bin/prometheus) on 127.0.0.1 with a private
data directory and a private configuration: the job `acode-syncd` scraping one daemon
every second, and the project's alert rules evaluated every second. The rules are a copy
of config/prometheus/alerts.yml in which only the `for:` durations are shortened (to
FOR_SECONDS, so that pending and firing happen within seconds); every expression,
label and annotation is the file's own, and Prometheus must load every rule of it.

What is asserted goes through Prometheus' own HTTP API: the records counter it scraped
equals the records PostgreSQL received (the keys its rows and applied_keys hold), and a
real outage (the daemon's PostgreSQL connections go through a TCP proxy that then
refuses them) takes AcodeSyncPostgresDown and AcodeSyncLagHigh from inactive to pending
to firing by Prometheus' own evaluation, and back to inactive once PostgreSQL answers
again, with no other alert along the way. The lag rule keeps its real threshold (600 s): the records
written during the outage carry an hour-old `created_at`, as an outbox that had waited
an hour would. Last, every metric the Grafana dashboard and the rules query is one the
daemon really serves, every dashboard query runs in Prometheus, and the DSN's password
is in no series Prometheus stored.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.daemon_harness import (
    DaemonProcess,
    NotifySocket,
    daemon_config,
    free_port,
    pg_applied,
    save_sessions,
    scrape,
    seed_sessions,
    wait_until,
    write_config,
)
from tests.proxy import TcpProxy
from tests.reliability.rig import SECRET, with_password
from tests.unit.test_monitoring import SYNTHETIC, alert_rules, promql_metric_names

pytestmark = [pytest.mark.postgres, pytest.mark.processes, pytest.mark.timeout(120)]

ROOT: Final = Path(__file__).resolve().parents[2]
ALERTS: Final = ROOT / "config" / "prometheus" / "alerts.yml"
DASHBOARDS: Final = sorted((ROOT / "config" / "grafana").glob("*.json"))
PROMETHEUS: Final = "/usr/bin/prometheus"
FOR_SECONDS: Final = 4
OUTAGE_ALERTS: Final = frozenset({"AcodeSyncPostgresDown", "AcodeSyncLagHigh"})
SHIPPED_BEFORE: Final = 5  # records shipped before the outage
WRITTEN_DURING: Final = 3  # records written during it, an hour old
# Grafana's variables, as a dashboard viewer would have them.
GRAFANA_VARIABLES: Final = {"instance": ".+", "__rate_interval": "15s", "__range": "5m"}
_FOR_LINE: Final = re.compile(r"^(\s+)for: \S+$", re.M)
_VARIABLE: Final = re.compile(r"\$\{?(\w+)\}?")


def short_for_rules(text: str) -> str:
    """alerts.yml with every `for:` shortened to FOR_SECONDS and nothing else changed."""
    rewritten, count = _FOR_LINE.subn(rf"\g<1>for: {FOR_SECONDS}s", text)
    assert count == sum("for" in rule for rule in alert_rules()), "a `for:` was missed"
    changed = [
        (old, new)
        for old, new in zip(text.splitlines(), rewritten.splitlines(), strict=True)
        if old != new
    ]
    assert all(old.strip().startswith("for:") for old, _ in changed), changed
    return rewritten


class Prometheus:
    """A Prometheus process of the test's own: its config, data and log in `workdir`."""

    def __init__(self, workdir: Path, target_port: int) -> None:
        workdir.mkdir()
        (workdir / "alerts.yml").write_text(short_for_rules(ALERTS.read_text()))
        config = {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "rule_files": ["alerts.yml"],
            "scrape_configs": [
                {
                    "job_name": "acode-syncd",
                    "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}],
                }
            ],
        }
        (workdir / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.port = free_port()
        self.log = workdir / "prometheus.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={workdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workdir,
            )

    def _get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        url = f"http://127.0.0.1:{self.port}{path}{query}"
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def wait_ready(self) -> None:
        def ready() -> bool:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2):
                    return True
            except OSError:
                return False

        wait_until(ready, "Prometheus ready", timeout=30)

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self._get("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", data
        result: list[dict[str, Any]] = data["result"]
        return result

    def value(self, expr: str) -> float | None:
        """The value of a one-series query, None while it has no series."""
        result = self.query(expr)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def rule_states(self) -> dict[str, str]:
        """Alert rule name -> inactive, pending or firing, as Prometheus last evaluated it."""
        groups = self._get("/api/v1/rules", type="alert")["groups"]
        return {rule["name"]: rule["state"] for group in groups for rule in group["rules"]}

    def alerts(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self._get("/api/v1/alerts")["alerts"]
        return found

    def series(self, selector: str) -> list[dict[str, str]]:
        """The label sets of every series Prometheus stores for `selector`."""
        found: list[dict[str, str]] = self._get("/api/v1/series", **{"match[]": selector})
        return found

    def metric_names(self) -> set[str]:
        return set(self._get("/api/v1/label/__name__/values"))

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


@contextlib.contextmanager
def prometheus(workdir: Path, target_port: int) -> Iterator[Prometheus]:
    server = Prometheus(workdir, target_port)
    try:
        server.wait_ready()
        yield server
    finally:
        server.close()


class StateLog:
    """Every state each alert rule has been seen in, in order, from the polls so far."""

    def __init__(self, server: Prometheus) -> None:
        self.server = server
        self.seen: dict[str, list[str]] = {}

    def poll(self) -> dict[str, str]:
        states = self.server.rule_states()
        for name, state in states.items():
            history = self.seen.setdefault(name, [])
            if not history or history[-1] != state:
                history.append(state)
        return states

    def wait(self, state: str, names: frozenset[str], what: str) -> None:
        """Until every rule of `names` is in `state` at once. A poll every 0.2 s sees
        each state a rule passes through: pending lasts FOR_SECONDS."""

        def reached() -> bool:
            states = self.poll()
            return all(states[name] == state for name in names)

        wait_until(reached, what, timeout=30, interval=0.2)


def exposed(text: str) -> tuple[set[str], set[str]]:
    """(series names with a sample, families declared without any) on a /metrics page."""
    with_samples: set[str] = set()
    empty: set[str] = set()
    for family in text_string_to_metric_families(text):
        names = {s.name for s in family.samples}
        with_samples |= names
        if not names:
            empty.add(family.name)
    return with_samples, empty


def grafana_queries() -> list[tuple[str, str]]:
    """(panel title, expression) of every panel target of every dashboard in config/grafana."""
    found = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for inner in [panel, *panel.get("panels", [])]:
                for target in inner.get("targets", []):
                    found.append((f"{path.name}: {inner['title']}", target["expr"]))
        for variable in board["templating"]["list"]:
            if variable["type"] == "query":
                found.append((f"{path.name}: ${variable['name']}", variable["definition"]))
    return found


def as_promql(expr: str) -> str:
    """A panel's expression with Grafana's variables filled in; label_values(m, l) -> m."""
    values = re.fullmatch(r"label_values\((\w+), *\w+\)", expr)
    if values is not None:
        return values[1]

    def fill(match: re.Match[str]) -> str:
        assert match[1] in GRAFANA_VARIABLES, f"unknown Grafana variable {match[0]} in {expr}"
        return GRAFANA_VARIABLES[match[1]]

    return _VARIABLE.sub(fill, expr)


def test_short_for_rules_changes_only_the_durations() -> None:
    text = ALERTS.read_text()
    rewritten = short_for_rules(text)
    assert rewritten != text
    assert _FOR_LINE.sub("", rewritten) == _FOR_LINE.sub("", text)
    assert as_promql('rate(x{instance=~"$instance"}[$__rate_interval])') == (
        'rate(x{instance=~".+"}[15s])'
    )
    with pytest.raises(AssertionError, match="unknown Grafana variable"):
        as_promql("rate(x[$__interval])")


@pytest.fixture
def prometheus_binary() -> None:
    if shutil.which(PROMETHEUS) is None:
        pytest.skip(f"{PROMETHEUS} is not installed (Debian: the prometheus package)")


@pytest.mark.usefixtures("prometheus_binary")
def test_prometheus_counts_the_records_and_fires_the_outage_alerts(
    tmp_path: Path, pg_url: str
) -> None:
    tmp_path = tmp_path.resolve()
    root, metrics_port = tmp_path / "root", free_port()
    root.mkdir()
    with (
        TcpProxy() as proxy,
        NotifySocket() as notify,
        prometheus(tmp_path / "prometheus", metrics_port) as server,
    ):
        config = daemon_config(
            dsn=proxy.dsn(with_password(pg_url)),  # trust auth ignores the password
            roots=[root],
            state_dir=tmp_path / "state",
            metrics_port=metrics_port,
            postgres={"connect_timeout": 2.0},
            sync={"outage_base_seconds": 0.2, "outage_cap_seconds": 1.0},
        )
        daemon = DaemonProcess.start(
            write_config(tmp_path / "acode-syncd.toml", config), notify=notify, workdir=tmp_path
        )
        try:
            notify.wait_for("READY=1")
            # Prometheus sees the counters at 0 before anything ships, as it would a
            # daemon it had been scraping for long: increase() then counts every record.
            counted = 'sum(acode_sync_records_total{job="acode-syncd"})'
            wait_until(lambda: server.value(counted) == 0, "the records counter at 0")
            assert set(server.rule_states()) == {rule["alert"] for rule in alert_rules()}
            log = StateLog(server)
            log.wait("inactive", frozenset(log.poll()), "every alert inactive")
            save_sessions(root / "before", SHIPPED_BEFORE)
            _shipped_records_are_counted(server, pg_url, SHIPPED_BEFORE)

            proxy.down()
            seed_sessions(root / "during", WRITTEN_DURING)
            log.wait("firing", OUTAGE_ALERTS, "the outage alerts firing")
            for name in OUTAGE_ALERTS:
                assert log.seen[name] == ["inactive", "pending", "firing"], log.seen
            firing = {a["labels"]["alertname"]: a for a in server.alerts()}
            assert set(firing) == OUTAGE_ALERTS, firing
            for alert in firing.values():
                assert alert["state"] == "firing"
                assert alert["labels"]["job"] == "acode-syncd"
                assert alert["labels"]["instance"] == f"127.0.0.1:{metrics_port}"
            assert pg_applied(pg_url) == SHIPPED_BEFORE

            proxy.restore()
            log.wait("inactive", OUTAGE_ALERTS, "the outage alerts resolved")
            assert server.alerts() == []
            _shipped_records_are_counted(server, pg_url, SHIPPED_BEFORE + WRITTEN_DURING)
            for name in OUTAGE_ALERTS:
                assert log.seen[name] == ["inactive", "pending", "firing", "inactive"], log.seen
            quiet = {name: states for name, states in log.seen.items() if name not in OUTAGE_ALERTS}
            assert all(states == ["inactive"] for states in quiet.values()), quiet

            _dashboard_and_rules_query_what_the_daemon_serves(server, scrape(metrics_port))
            stored = json.dumps(server.series('{job="acode-syncd"}'))
            assert "acode_sync_records_total" in stored
            assert SECRET not in stored
            daemon.signal(signal.SIGTERM)
            assert daemon.wait() == 0
            daemon.assert_no_traceback()
        finally:
            daemon.close()


def _shipped_records_are_counted(server: Prometheus, pg_url: str, records: int) -> None:
    """PostgreSQL has `records` records, and Prometheus' records counter says exactly that."""
    wait_until(lambda: pg_applied(pg_url) == records, f"{records} in PostgreSQL")
    counted = 'sum(acode_sync_records_total{job="acode-syncd"})'
    wait_until(lambda: server.value(counted) == records, f"{records} counted in Prometheus")
    time.sleep(2)  # two more scrapes: the count stays exact, nothing counted twice
    assert server.value(counted) == pg_applied(pg_url) == records
    by_result = {
        r["metric"]["result"]: float(r["value"][1])
        for r in server.query("acode_sync_records_total")
    }
    assert by_result == {"applied": records, "duplicate": 0, "conflict": 0}


def _dashboard_and_rules_query_what_the_daemon_serves(server: Prometheus, metrics: str) -> None:
    """Every metric a dashboard panel or a rule selects is on the daemon's /metrics page (a
    labelled family with no series yet is declared there; `up` is Prometheus' own) and
    stored by Prometheus; every dashboard query runs in Prometheus, and returns series
    unless it selects only such empty families."""
    with_samples, empty = exposed(metrics)
    stored = server.metric_names()
    queries = grafana_queries() + [(rule["alert"], rule["expr"]) for rule in alert_rules()]
    assert len(queries) > len(alert_rules())
    for where, expr in queries:
        names = promql_metric_names(as_promql(expr))
        assert names, (where, expr)
        missing = names - SYNTHETIC - with_samples - empty
        assert not missing, f"{where}: {sorted(missing)} not on the daemon's /metrics"
        assert names - empty <= stored, f"{where}: {sorted(names - empty - stored)} not stored"
    for where, expr in grafana_queries():
        result = server.query(as_promql(expr))
        names = promql_metric_names(as_promql(expr))
        assert result or names <= empty, f"{where}: no series for {expr}"
