"""pytest plugin of the reliability suite (loaded from tests/conftest.py).

- `--soak` (or ACODE_SOAK=1): multiply the suite's counts and durations
  (ACODE_SOAK_FACTOR, 10 by default) for a long run.
- Every scenario adds a row to the summary table printed at the end of the run (and
  written as JSON to $ACODE_RELIABILITY_REPORT when that is set).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

ROWS: list[dict[str, Any]] = []
COLUMNS = (
    ("fault", 44),
    ("runs", 5),
    ("records", 8),
    ("lost", 5),
    ("dup", 4),
    ("wrong", 6),
    ("stuck", 6),
    ("dead", 5),
    ("unledg", 7),
    ("resends", 8),
    ("recovery_s", 10),
)


def soak() -> bool:
    return os.environ.get("ACODE_SOAK", "") not in ("", "0")


def scaled(ci: float, soak_value: float | None = None) -> float:
    """`ci` in the normal run; in soak mode `soak_value`, or ci x ACODE_SOAK_FACTOR."""
    if not soak():
        return ci
    if soak_value is not None:
        return soak_value
    return ci * float(os.environ.get("ACODE_SOAK_FACTOR", "10"))


def add_row(**row: Any) -> None:
    ROWS.append(row)


def table() -> str:
    head = " | ".join(name.ljust(width) for name, width in COLUMNS)
    lines = [head, "-" * len(head)]
    for row in ROWS:
        cells = []
        for name, width in COLUMNS:
            value = row.get(name, "")
            text = f"{value:.1f}" if isinstance(value, float) else str(value)
            cells.append(text.ljust(width))
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak",
        action="store_true",
        default=False,
        help="reliability suite: long soak run (same as ACODE_SOAK=1)",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--soak"):
        os.environ["ACODE_SOAK"] = "1"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not ROWS:
        return
    mode = "SOAK" if soak() else "CI-bounded"
    terminalreporter.write_sep("=", f"reliability summary ({mode})")
    terminalreporter.write_line(table())
    report = os.environ.get("ACODE_RELIABILITY_REPORT")
    if report:
        Path(report).write_text(json.dumps({"mode": mode, "rows": ROWS}, indent=2))
