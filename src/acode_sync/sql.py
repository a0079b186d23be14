"""SQL lives in .sql files beside this module, split into named statements."""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import cache
from importlib import resources

_NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)


def parse_named_queries(text: str) -> dict[str, str]:
    """Split `-- name: x` blocks; comment lines between blocks are dropped."""
    parts = _NAME.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = [line for line in body.splitlines() if not line.lstrip().startswith("--")]
        if name in queries:
            raise ValueError(f"query {name!r} is defined twice")
        queries[name] = "\n".join(lines).strip()
    return queries


@cache
def queries(dialect: str) -> Mapping[str, str]:
    text = resources.files("acode_sync").joinpath("sql", dialect, "queries.sql").read_text()
    return parse_named_queries(text)
