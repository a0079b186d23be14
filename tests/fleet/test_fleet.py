"""The fleet simulator, bounded: 50 independent daemons through PgBouncer under an agent's
load, and 50 cold starts at once on an empty database. Only the ledger, the migration and
the errors are asserted here; the figures (and their timing targets) are the full runs'
(docs/performance.md)."""

from __future__ import annotations

import pytest

from tests.fleet.simulate import main

pytestmark = [pytest.mark.postgres, pytest.mark.processes, pytest.mark.timeout(600)]


def test_fifty_daemons_ship_everything_once_through_pgbouncer_without_an_error() -> None:
    report = main(["--scenario", "steady", "--daemons", "50", "--seconds", "20"])
    assert report.checks["all offered load shipped, nothing twice"], report.lines
    assert report.checks["zero errors"], report.lines
    assert report.checks["server connections within the pool"], report.lines


def test_fifty_cold_starts_migrate_once_and_none_fails() -> None:
    report = main(["--scenario", "cold-start", "--daemons", "50"])
    assert report.checks["exactly one daemon applied the migrations"], report.lines
    assert report.checks["none failed"], report.lines
    assert report.checks["every record shipped once"], report.lines
