"""`acode db verify` over a large workspace, as a child process.

    python -m tests.bench.bench_verify [--entities 1000000]

A workspace of `--entities` sessions (rows and their outbox records, shipped: the mark
is past them) and PostgreSQL holding the same versions (loaded with binary COPY, digests
included). `acode db verify --json` then runs at a tenth of the size and at the full
size; each prints entities/s, the wall time and the child's peak RSS (flat memory: the
two RSS figures stay close). Baselines in the same run: a bare SQLite scan of the ids
and a bare keyset scan of (id, updated_at, digest) in PostgreSQL, pages of 5000.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import anyio
import asyncpg

from acode_sync.config import PostgresSettings
from acode_sync.domain import Session, format_timestamp, idempotency_key, stamped
from acode_sync.postgres import PostgresTarget
from acode_sync.sql import queries
from acode_sync.store import WorkspaceDatabase, encode_json, outbox_row
from acode_sync.workspace import database_path
from tests.pg import create_database, database_url, drop_database

TARGET_SECONDS_PER_MILLION: Final = 60.0
CHUNK: Final = 50_000
_SQLITE = queries("sqlite")
ACODE: Final = str(Path(sys.executable).parent / "acode")


def seed(workspace: Path, dsn: str, count: int) -> None:
    """`count` sessions in the workspace and the same versions in PostgreSQL."""
    workspace.mkdir(parents=True)
    db = WorkspaceDatabase(workspace)
    origin = db.origin_id
    db.close()
    anyio.run(_migrate, dsn)
    conn = sqlite3.connect(database_path(workspace), isolation_level=None)
    base = datetime.now(UTC) - timedelta(hours=2)
    for start in range(0, count, CHUNK):
        rows, records, central = [], [], []
        for n in range(start, min(count, start + CHUNK)):
            moment = base + timedelta(microseconds=n)
            stamp = format_timestamp(moment)
            session = stamped(Session(title=f"bench {n}"), created_at=stamp, updated_at=stamp)
            row = session.row()
            payload = encode_json(row)
            key = idempotency_key("Session", session.session_id, stamp)
            rows.append(row)
            records.append(outbox_row(key, "Session", session.session_id, session.session_id,
                                      payload, None, stamp))  # fmt: skip
            central.append((session.session_id, "CREATED", row["title"], None, moment, moment,
                            "{}", origin, key, moment,
                            hashlib.sha256(payload.encode()).digest()))  # fmt: skip
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(_SQLITE["save_sessions"], rows)
        conn.executemany(_SQLITE["insert_outbox"], records)
        conn.execute("COMMIT")
        anyio.run(_copy, dsn, central)
    now = format_timestamp(datetime.now(UTC))
    conn.execute(
        "INSERT INTO outbox_progress (through_id, processed_at, created_at) "
        "SELECT max(outbox_id), ?, ? FROM outbox_records",
        (now, now),
    )
    conn.close()


async def _migrate(dsn: str) -> None:
    target = PostgresTarget(PostgresSettings(dsn=dsn))
    try:
        await target.ensure_schema(explicit=True)
    finally:
        await target.close()


async def _copy(dsn: str, rows: Sequence[tuple[Any, ...]]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.copy_records_to_table(
            "sessions",
            schema_name="acode",
            records=rows,
            columns=["session_id", "state", "title", "metadata", "created_at", "updated_at",
                     "extra", "origin_id", "idempotency_key", "synced_at", "payload_digest"],
        )  # fmt: skip
    finally:
        await conn.close()


def run_verify(workspace: Path, dsn: str) -> tuple[float, float, dict[str, object]]:
    """(seconds, peak RSS in MiB, the report) of one `acode db verify --json` child."""
    env = {**os.environ, "ACODE_POSTGRES_URL": dsn, "XDG_CONFIG_HOME": str(workspace)}
    out_path, err_path = workspace / "verify.out", workspace / "verify.err"
    started = time.perf_counter()
    with out_path.open("wb") as out, err_path.open("wb") as err:
        child = subprocess.Popen(
            [ACODE, "db", "verify", "--json", "--workspace", str(workspace)],
            stdout=out,
            stderr=err,
            env=env,
        )
        _, status, usage = os.wait4(child.pid, 0)  # this child's own peak RSS
        child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    rss = usage.ru_maxrss / 1024
    if child.returncode != 0:
        raise SystemExit(f"verify failed: {err_path.read_text()[-2000:]}")
    printed = out_path.read_text()
    return seconds, rss, json.loads(printed)


def baseline_sqlite(workspace: Path) -> float:
    started = time.perf_counter()
    conn = sqlite3.connect(database_path(workspace))
    for _ in conn.execute("SELECT session_id, updated_at FROM sessions ORDER BY session_id"):
        pass
    conn.close()
    return time.perf_counter() - started


async def baseline_postgres(dsn: str) -> float:
    conn = await asyncpg.connect(dsn)
    started = time.perf_counter()
    after = ""
    try:
        while rows := await conn.fetch(
            "SELECT session_id, updated_at, payload_digest FROM acode.sessions "
            "WHERE session_id > $1 ORDER BY session_id LIMIT 5000",
            after,
        ):
            after = rows[-1][0]
    finally:
        await conn.close()
    return time.perf_counter() - started


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.bench_verify", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--entities", type=int, default=1_000_000)
    parser.add_argument("--dir", type=Path, default=None, help="where the workspaces go")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-verify-", dir=args.dir))
    print(f"acode-sync verify benchmark: {args.entities} sessions, shipped and held centrally")
    try:
        for count in sorted({max(1, args.entities // 10), args.entities}):
            name = create_database()
            dsn = database_url(name)
            try:
                workspace = root / f"ws-{count}"
                started = time.perf_counter()
                seed(workspace, dsn, count)
                print(f"seeded {count} in {time.perf_counter() - started:.1f} s")
                seconds, rss, report = run_verify(workspace, dsn)
                assert (report["ok"], report["checked"]) == (True, count), report
                target = TARGET_SECONDS_PER_MILLION * count / 1_000_000
                met = "met" if seconds <= target else "MISSED"
                sqlite_s = baseline_sqlite(workspace)
                pg_s = anyio.run(baseline_postgres, dsn)
                print(
                    f"verify {count} entities: {seconds:.2f} s, {count / seconds:,.0f} "
                    f"entities/s, peak RSS {rss:.0f} MiB  (target <= {target:.1f} s: {met})"
                )
                print(
                    f"  baselines: SQLite id scan {sqlite_s:.2f} s, PostgreSQL keyset scan "
                    f"{pg_s:.2f} s; verify / (both) = {seconds / (sqlite_s + pg_s):.1f}x"
                )
            finally:
                drop_database(name)
                shutil.rmtree(root / f"ws-{count}", ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
