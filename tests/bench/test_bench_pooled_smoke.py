"""The pooled-batch benchmark runs end to end at a tiny size (its figures, not timings)."""

from __future__ import annotations

import re

import pytest

from tests.bench.bench_pooled import main

pytestmark = pytest.mark.postgres


def test_the_pooled_batch_benchmark_prints_both_statements_and_both_modes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--batches", "5", "--records", "2", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"every table .*parse +\d+\.\d\d ms, plan +\d+\.\d\d ms", out)
    assert re.search(r"SessionEvent alone: .*plan +\d+\.\d\d ms +\d\.\d\dx", out)
    assert re.search(r"statement cache on: +CPU +\d+\.\d\d ms +wall +\d+\.\d\d ms", out)
    assert re.search(r"a pooler\): +CPU +\d+\.\d\d ms +wall .* the CPU", out)
