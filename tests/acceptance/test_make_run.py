"""`make run`'s set-up, run as the README runs it: its own PostgreSQL database, created
when missing and said on screen, and the workspace it creates kept out of git."""

from __future__ import annotations

import subprocess
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg
import pytest

from tests.pg import ADMIN_URL, _new_name, drop_database

ROOT = Path(__file__).resolve().parents[2]
SERVER = urlunsplit(urlsplit(ADMIN_URL)._replace(path=""))
SHOWN = urlsplit(ADMIN_URL).netloc.rpartition("@")[2]


def make(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(ROOT), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


async def database_exists(name: str) -> bool:
    conn = await asyncpg.connect(ADMIN_URL)
    try:
        return bool(await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name))
    finally:
        await conn.close()


def make_variable(name: str, *args: str) -> str:
    done = make(f"--eval=print-variable: ; @echo $({name})", "print-variable", *args)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_run_ships_into_a_database_of_its_own_by_default() -> None:
    assert make_variable("ACODE_POSTGRES_URL") == "postgresql://postgres@127.0.0.1:5432/acode"
    assert make_variable("ACODE_POSTGRES_URL", "DATABASE=mine").endswith(":5432/mine")
    assert "createdb --maintenance-db='postgresql://postgres@127.0.0.1:5432/postgres' 'acode'" in (
        make("-n", "run").stdout
    )


def test_run_never_prints_the_url_it_is_given() -> None:
    done = make("-n", "run", "ACODE_POSTGRES_URL=postgresql://me:s3cret@db.example/acode")
    assert done.returncode == 0
    assert "s3cret" not in done.stdout + done.stderr
    assert "make run: ships into ACODE_POSTGRES_URL (creates no database)" in done.stdout


@pytest.mark.postgres
@pytest.mark.processes
def test_the_database_is_created_once_and_said_on_screen() -> None:
    name = _new_name()
    try:
        first = make("database", f"POSTGRES_SERVER={SERVER}", f"DATABASE={name}")
        assert (first.returncode, first.stderr) == (0, "")
        assert first.stdout == (
            f"make run: created the PostgreSQL database {name} at {SHOWN}; ships into it\n"
        )
        assert anyio.run(database_exists, name)
        again = make("database", f"POSTGRES_SERVER={SERVER}", f"DATABASE={name}")
        assert (again.returncode, again.stdout) == (
            0,
            f"make run: ships into the PostgreSQL database {name} at {SHOWN} (it exists)\n",
        )
    finally:
        drop_database(name)


@pytest.mark.processes
def test_a_server_that_is_down_stops_nothing() -> None:
    done = make("database", "POSTGRES_SERVER=postgresql://postgres@127.0.0.1:1")
    assert (done.returncode, done.stdout) == (
        0,
        "make run: no PostgreSQL at 127.0.0.1:1 yet; records wait in the outbox until one is "
        "up with a database acode\n",
    )


@pytest.mark.processes
def test_the_workspace_make_run_creates_is_ignored_by_git() -> None:
    for path in (".agent/workspace.db", ".agent/workspace.db-wal", ".agent/sync.lock"):
        done = subprocess.run(
            ["git", "-C", str(ROOT), "check-ignore", "--no-index", "-q", path], check=False
        )
        assert done.returncode == 0, f"{path} is not ignored by .gitignore"
