"""Scenario 6: two writers of the same sessions in two workspaces (two origins) with
clocks 30 s ahead and 30 s behind; scenario 8: generated titles and metadata through
the whole path (store -> syncer -> PostgreSQL)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from acode_sync.config import PostgresSettings, SyncSettings
from acode_sync.domain import Session, format_timestamp
from acode_sync.postgres import PostgresTarget
from acode_sync.store import WorkspaceDatabase, encode_json
from acode_sync.sync import WorkspaceSyncer
from acode_sync.workspace import database_path
from tests.reliability import plugin
from tests.reliability.rig import Rig, assert_clean, prepare_postgres, rig, summarise, with_password

pytestmark = [
    pytest.mark.reliability,
    pytest.mark.postgres,
    pytest.mark.processes,
    pytest.mark.timeout(600),
]
__all__ = ["rig"]


async def _fetch(dsn: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


def _order(updated_at: datetime, origin: str, key: str) -> tuple[str, str, str]:
    return (format_timestamp(updated_at), origin, key)


def test_clock_skew_between_two_writers_of_the_same_sessions(rig: Rig) -> None:
    records = int(plugin.scaled(60))
    fast, slow = rig.workspace("fast"), rig.workspace("slow")
    daemon = rig.start_daemon()
    writers = [
        rig.loadgen(
            [workspace],
            "--shared-sessions",
            "5",
            "--clock-offset",
            offset,
            "--tag",
            workspace.name,
            "--records",
            str(records),
            "--pause",
            "0.005",
        )
        for workspace, offset in ((fast, "30"), (slow, "-30"))
    ]
    for writer in writers:
        writer.check_ok()
    rig.wait_drained()
    rig.stop_daemon(daemon)

    report = rig.check()  # wrong winners 0: each row is the ledger's LWW winner
    summarise("clock skew +30 s / -30 s, same sessions", report, runs=1)
    assert_clean(report)
    sessions = anyio.run(_fetch, rig.pg_url, "SELECT session_id, title FROM acode.sessions")
    assert len(sessions) == 5
    assert all(str(row["title"]).startswith("fast ") for row in sessions)  # +30 s wins
    conflicts = anyio.run(
        _fetch,
        rig.pg_url,
        "SELECT incoming_updated_at, incoming_origin, incoming_key, current_updated_at, "
        "current_origin, current_key, winner FROM acode.conflicts",
    )
    assert len(conflicts) >= 1
    for c in conflicts:
        incoming = _order(c["incoming_updated_at"], c["incoming_origin"], c["incoming_key"])
        current = _order(c["current_updated_at"], c["current_origin"], c["current_key"])
        assert c["winner"] == ("incoming" if incoming > current else "current"), dict(c)
    # Every slow record PostgreSQL saw after a fast version is a conflict that lost.
    assert report.superseded >= 1
    rig.assert_no_secret()


# --------------------------------------------------------------------------- 8

_text = st.text(
    alphabet=st.one_of(
        st.characters(codec="utf-8", exclude_categories=["Cs"]),
        st.sampled_from(["\x00", "'", '"', "\\", "\u2028", "😀", "\ufeff", "$", "%"]),
    ),
    max_size=40,
)
_long = st.text(min_size=1, max_size=2).map(lambda s: s * 2000)  # long strings
_json: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False, width=64)
    | _text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_text, children, max_size=4),
    max_leaves=12,
)


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    return False


STATS = {"examples": 0, "round_trips": 0, "dead": 0}


class Fuzz:
    def __init__(self, workspace: Path, dsn: str) -> None:
        self.workspace = workspace
        self.dsn = dsn
        workspace.mkdir()
        self.db = WorkspaceDatabase(workspace)

    async def sync(self) -> None:
        target = PostgresTarget(PostgresSettings(dsn=self.dsn))
        try:
            # max_attempts 1: a refused record is dead at once (the daemon test proves 10)
            syncer = WorkspaceSyncer(
                workspace=self.workspace,
                target=target,
                settings=SyncSettings(max_attempts=1, batch_max_records=10),
            )
            await syncer.drain()
        finally:
            await target.close()

    def state(self, key: str) -> tuple[str, str | None]:
        conn = sqlite3.connect(database_path(self.workspace))
        try:
            state, error = conn.execute(
                "SELECT state, last_error FROM outbox WHERE idempotency_key = ?", (key,)
            ).fetchone()
            return str(state), error
        finally:
            conn.close()


@pytest.fixture
def fuzz(tmp_path: Path, pg_url: str) -> Iterator[Fuzz]:
    dsn = with_password(pg_url)
    anyio.run(prepare_postgres, dsn)
    made = Fuzz(tmp_path / "fuzzed", dsn)
    try:
        yield made
    finally:
        made.db.close()


@settings(
    max_examples=int(plugin.scaled(25, 500)),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)
@given(title=_text | _long, metadata=_json, other=_text)
@example(title="a\x00b", metadata=None, other="after the poison")
@example(title="fine", metadata={"deep": [{"k\x00": 1}]}, other="")
@example(title="'; DROP TABLE acode.sessions; --", metadata={"\u2028": "$$"}, other="\\")
def test_generated_text_and_json_round_trip_or_die_cleanly(
    fuzz: Fuzz, title: str, metadata: Any, other: str
) -> None:
    # The poison record goes first: a good record behind it (another entity) must not wait.
    saved = fuzz.db.save(Session(title=title, metadata=metadata))
    good = fuzz.db.save(Session(title=other.replace("\x00", ""), metadata={"ok": True}))
    anyio.run(fuzz.sync)
    STATS["examples"] += 1
    key = f"Session:{saved.session_id}:{saved.updated_at}"
    rows = anyio.run(
        _fetch,
        fuzz.dsn,
        f"SELECT session_id, title, metadata::text AS metadata FROM acode.sessions "
        f"WHERE session_id IN ('{saved.session_id}', '{good.session_id}')",
    )
    held = {row["session_id"]: row for row in rows}
    assert held[good.session_id]["title"] == good.title
    state, error = fuzz.state(key)
    if _has_nul(title) or _has_nul(metadata):
        assert state == "dead"
        assert error is not None
        assert error.startswith("22P05"), error  # \u0000 refused
        assert saved.session_id not in held
        STATS["dead"] += 1
        return
    assert state == "processed", error
    row = held[saved.session_id]
    assert row["title"] == title
    # Numbers compared as numbers: jsonb keeps them as `numeric` (7.205759403792153e16
    # comes back as 72057594037921530, the same number), Python's json would not.
    exact = json.loads(encode_json(metadata), parse_float=Decimal, parse_int=Decimal)
    back = (
        None
        if row["metadata"] is None
        else json.loads(row["metadata"], parse_float=Decimal, parse_int=Decimal)
    )
    assert back == exact
    STATS["round_trips"] += 1


def test_fuzz_summary_row() -> None:
    """The fuzz test's row in the summary table (after it, in file order)."""
    if not STATS["examples"]:
        pytest.skip("the fuzz test did not run in this session")
    plugin.add_row(
        fault=f"hypothesis payloads ({STATS['round_trips']} exact, {STATS['dead']} NUL dead)",
        runs=STATS["examples"],
        records=2 * STATS["examples"],
        lost=0,
        dup=0,
        wrong=0,
        stuck=0,
        dead=STATS["dead"],
    )
