"""The monitoring files in config/: promtool accepts and unit-tests the rules, and the rules,
the dashboard and the docs' PromQL name only metrics the daemon really exposes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from acode_sync.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "config" / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
DASHBOARD = ROOT / "config" / "grafana" / "acode-sync.json"
OPERATIONS = ROOT / "docs" / "operations.md"

# What the suite runs, from the repository's root. The docs may show exactly these
# (tests/unit/test_doc_commands.py).
PROMTOOL_COMMANDS = (
    ("promtool", "check", "rules", "config/prometheus/alerts.yml"),
    ("promtool", "test", "rules", "config/prometheus/alerts_test.yml"),
    ("promtool", "check", "config", "config/prometheus/prometheus.yml"),
)
# Series Prometheus makes itself for each target.
SYNTHETIC = {"up"}
SEVERITIES = {"critical", "warning"}
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gauge": ("",),
}

# PromQL words that are not metric names.
FUNCTIONS = {
    *("abs", "absent", "absent_over_time", "avg_over_time", "ceil", "changes", "clamp"),
    *("clamp_max", "clamp_min", "count_over_time", "delta", "deriv", "exp", "floor"),
    *("histogram_quantile", "holt_winters", "idelta", "increase", "irate", "label_join"),
    *("label_replace", "last_over_time", "ln", "log2", "log10", "max_over_time"),
    *("min_over_time", "predict_linear", "quantile_over_time", "rate", "resets", "round"),
    *("scalar", "sgn", "sort", "sort_desc", "sqrt", "stddev_over_time", "sum_over_time"),
    *("time", "timestamp", "vector", "present_over_time"),
    *("sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values"),
    *("bottomk", "topk", "quantile"),
}
KEYWORDS = {"and", "or", "unless", "bool", "inf", "nan"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_OFFSET = re.compile(r"\boffset\s+-?\w+")
_WORD = re.compile(r"(?<![\w.:$])[A-Za-z_:][A-Za-z0-9_:]*")


def exposed_families(text: str) -> dict[str, str]:
    """Family name -> type, for every family of an exposition, with or without samples (a
    labelled gauge exposes no sample until a label set is used)."""
    return {family.name: family.type for family in text_string_to_metric_families(text)}


@cache
def exposed_names() -> frozenset[str]:
    """Every series name the daemon's registry can expose: each family's names by type, as
    in the text format (what generate_latest serves) and present in OpenMetrics too (what
    Prometheus negotiates)."""
    registry = Metrics().registry
    text = generate_latest(registry).decode()
    names: set[str] = set()
    for name, kind in exposed_families(text).items():
        names.update(name + suffix for suffix in SUFFIXES[kind])
    openmetrics = generate_openmetrics(registry).decode()  # type: ignore[no-untyped-call]
    in_openmetrics = set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", openmetrics, re.M))
    in_openmetrics |= set(re.findall(r"^# TYPE (\S+) ", openmetrics, re.M))
    for name in names:
        family = re.sub(r"_(total|created|bucket|count|sum)$", "", name)
        assert name in in_openmetrics or family in in_openmetrics, name
    return frozenset(names)


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects. Strings, label matchers, ranges and
    grouping labels are removed first; an unknown function is an error, not a name."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _OFFSET.sub(" ", text)
    names = set()
    for match in _WORD.finditer(text):
        word = match[0]
        if text[match.end() :].lstrip().startswith("("):
            assert word in FUNCTIONS, f"unknown PromQL function {word}( in {expr}"
        elif word.lower() not in KEYWORDS:
            names.add(word)
    return names


def test_promql_metric_names() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(a_bucket{job="x", le=~"1e3"}[5m])))'
        " / on (instance) group_left (code) b offset 5m > bool 1e3 and c{d='e'} unless"
        " max without (result) (d_total[$__rate_interval])"
    )
    assert promql_metric_names(expr) == {"a_bucket", "b", "c", "d_total"}
    with pytest.raises(AssertionError, match="unknown PromQL function"):
        promql_metric_names("rat(a[5m])")


def yaml_rules(text: str) -> list[dict[str, str]]:
    """The rules of alerts.yml, read line by line: this file's own subset of YAML (`- alert:`
    items, `key: value` and `key: >-` block scalars; promtool checks the whole file). Each
    rule maps its keys, labels and annotations (`severity`, `summary`, ...) to strings."""
    rules: list[dict[str, str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        match = re.match(r"^(\s*)(?:- )?(\w+): ?(.*)$", line)
        if match is None or line.lstrip().startswith("#"):
            continue
        indent, key, value = len(match[1]), match[2], match[3]
        if line.lstrip().startswith("- alert:"):
            rules.append({})
        if not rules:
            continue
        if value in (">-", ">", "|", "|-"):
            block = []
            while i < len(lines) and (
                not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent
            ):
                block.append(lines[i].strip())
                i += 1
            value = " ".join(part for part in block if part)
        elif value.startswith('"') and value.endswith('"'):
            value = value[1:-1]
        if value:
            rules[-1][key] = value
    return rules


@cache
def alert_rules() -> list[dict[str, str]]:
    return yaml_rules(ALERTS.read_text())


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a file's headings."""
    anchors = set()
    for heading in re.findall(r"^#{1,6} (.+)$", markdown, re.M):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("command", PROMTOOL_COMMANDS, ids=" ".join)
def test_promtool_accepts_the_configuration_and_the_rules(command: tuple[str, ...]) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: the prometheus package)")
    done = subprocess.run(
        [promtool, *command[1:]], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    if command[1:3] == ("check", "rules"):
        # The line reader below sees the same rules as promtool.
        assert f"SUCCESS: {len(alert_rules())} rules found" in done.stdout


def test_the_alert_rules_name_only_exposed_metrics() -> None:
    names = exposed_names()
    assert len(alert_rules()) >= 8
    for rule in alert_rules():
        used = promql_metric_names(rule["expr"])
        assert used, rule["alert"]
        assert used <= names | SYNTHETIC, (rule["alert"], sorted(used - names - SYNTHETIC))


def test_every_alert_has_a_severity_annotations_and_a_runbook_section() -> None:
    anchors = github_anchors(OPERATIONS.read_text())
    seen = set()
    for rule in alert_rules():
        name = rule["alert"]
        assert name not in seen, f"{name} is defined twice"
        seen.add(name)
        assert rule.get("severity") in SEVERITIES, name
        assert rule.get("summary"), name
        assert rule.get("description"), name
        assert rule.get("runbook_url") == f"docs/operations.md#{name.lower()}", name
        assert name.lower() in anchors, f"docs/operations.md needs a '### {name}' section"


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    text = (PROMETHEUS / "alerts_test.yml").read_text()
    firing: set[str] = set()
    quiet: set[str] = set()
    for match in re.finditer(r"alertname: (\w+)\n\s+exp_alerts:( \[\])?", text):
        (quiet if match[2] else firing).add(match[1])
    names = {rule["alert"] for rule in alert_rules()}
    assert firing == names, sorted(names ^ firing)
    assert quiet == names, sorted(names ^ quiet)


def test_the_docs_name_only_the_alerts_that_exist() -> None:
    names = {rule["alert"] for rule in alert_rules()}
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        mentioned = set(re.findall(r"\bAcodeSyncd?[A-Z]\w+", path.read_text()))
        assert mentioned <= names, (path.name, sorted(mentioned - names))
    assert names <= set(
        re.findall(r"\bAcodeSyncd?[A-Z]\w+", (ROOT / "docs/metrics.md").read_text())
    )


def test_the_docs_promql_names_only_exposed_metrics() -> None:
    names = exposed_names() | SYNTHETIC
    blocks = 0
    for path in sorted((ROOT / "docs").glob("*.md")):
        for block in re.findall(r"^```promql\n(.*?)^```", path.read_text(), re.M | re.S):
            blocks += 1
            for line in block.splitlines():
                used = promql_metric_names(line)
                assert used <= names, (path.name, line, sorted(used - names))
    assert blocks > 0


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for panel in board["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return found


def test_the_dashboard_names_only_exposed_metrics() -> None:
    board = dashboard()
    names = exposed_names()
    used: set[str] = set()
    for panel in panels(board):
        for target in panel.get("targets", []):
            metrics = promql_metric_names(target["expr"])
            assert metrics, (panel["title"], target["expr"])
            assert metrics <= names | SYNTHETIC, (panel["title"], sorted(metrics - names))
            used |= metrics
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            metric = re.fullmatch(r"label_values\((\w+), *\w+\)", variable["definition"])
            assert metric is not None, variable["definition"]
            assert metric[1] in names
            used.add(metric[1])
    # Every family of the daemon's own is on the dashboard (its `_created` gauges aside;
    # the client's standard process_* and python_* families are the dashboard's choice).
    own = {name for name in names if name.startswith("acode_sync_")}
    families = {re.sub(r"_(total|bucket|count|sum)$", "", name) for name in own}
    shown = {re.sub(r"_(total|bucket|count|sum)$", "", name) for name in used}
    missing = {f for f in families - shown if not f.endswith("_created")}
    assert not missing, sorted(missing)


def test_the_dashboard_is_well_formed() -> None:
    board = dashboard()
    assert board["uid"] == "acode-sync"
    assert 36 <= board["schemaVersion"] <= 41
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    source = {"type": "prometheus", "uid": "${datasource}"}
    ids = [panel["id"] for panel in panels(board)]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in panels(board):
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, (panel["title"], cells.get((x, y)))
                cells[(x, y)] = panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == source, panel["title"]
        assert panel.get("description"), panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert refs, panel["title"]
        assert len(refs) == len(set(refs)), panel["title"]
        assert all(target["datasource"] == source for target in panel["targets"])
