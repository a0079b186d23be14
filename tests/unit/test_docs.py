"""The docs stay true: api.md's example runs, errors.md documents exactly the real codes."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from acode_sync.errors import ALL_ERRORS

DOCS = Path(__file__).resolve().parents[2] / "docs"
EXAMPLE_MARKER = "<!-- example: runs in tests/unit/test_docs.py -->"
_EXAMPLE = re.compile(re.escape(EXAMPLE_MARKER) + r"\n```python\n(.*?)```", re.DOTALL)
_HEADING = re.compile(r"^## (ACODE-DB-\d{3}): \S.*$", re.MULTILINE)
_ANY_CODE = re.compile(r"ACODE-DB-\d{3}")


def api_example() -> str:
    text = (DOCS / "api.md").read_text()
    blocks = _EXAMPLE.findall(text)
    assert text.count(EXAMPLE_MARKER) == 1
    assert len(blocks) == 1, "the marker must be followed directly by a ```python block"
    return str(blocks[0])


def test_the_api_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = api_example()
    assert "assert " in source  # the example checks its own results
    monkeypatch.chdir(tmp_path)
    exec(compile(source, str(DOCS / "api.md"), "exec"), {"__name__": "docs_api_example"})
    assert (tmp_path / "demo-workspace" / ".agent" / "workspace.db").is_file()


def test_every_error_code_has_one_heading_in_errors_md() -> None:
    text = (DOCS / "errors.md").read_text()
    codes = [error.code for error in ALL_ERRORS]
    assert codes == [f"ACODE-DB-{n:03d}" for n in range(1, 8)]
    headings = Counter(_HEADING.findall(text))
    for code in codes:
        assert headings[code] == 1, f"docs/errors.md needs one '## {code}: title' heading"


def test_errors_md_names_no_code_that_does_not_exist() -> None:
    text = (DOCS / "errors.md").read_text()
    known = {error.code for error in ALL_ERRORS}
    assert set(_ANY_CODE.findall(text)) <= known
