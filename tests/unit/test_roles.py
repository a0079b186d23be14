"""The syncer's rights are one list: the documented grants are exactly what `acode db
grant` runs and what check-config checks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from acode_sync.cli import main
from acode_sync.roles import SYNCER_PRIVILEGES, grant_statements

DOCS = Path(__file__).resolve().parents[2] / "docs" / "postgres.md"


def test_the_documented_grants_are_what_acode_db_grant_runs() -> None:
    section = DOCS.read_text().split("## A least-privilege syncer role", 1)[1]
    block = re.search(r"```sql\n(.*?)```", section, re.DOTALL)
    assert block is not None
    documented = [line for line in block[1].splitlines() if line.startswith("GRANT")]
    assert documented == grant_statements("acode_sync", "acode")


def test_every_checked_privilege_is_granted() -> None:
    granted = "\n".join(grant_statements("r", "d"))
    for kind, name, privilege in SYNCER_PRIVILEGES:
        line = next(
            line
            for line in granted.splitlines()
            if line.split(" ON ")[1].split(" TO")[0].endswith(name)
        )
        assert privilege in line.split(" ON ")[0], (kind, name, privilege)


def test_grant_without_postgres_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["db", "migrate", "--grant", "someone"]) == 1
    assert "ACODE-DB-006: --grant goes with --postgres" in capsys.readouterr().err
