"""A private PgBouncer (Debian's pgbouncer package) in front of a PostgreSQL server, for
tests: run by the postgres user in the foreground as this process's child, from a config
of its own in a temporary directory, on a free port of 127.0.0.1, removed afterwards.

    with pgbouncer(upstream=("127.0.0.1", 5432), default_pool_size=2) as bouncer:
        bouncer.url(pg_url)              # the same database, through PgBouncer
        bouncer.show("POOLS")            # the admin console: a list of dicts, one a row
        bouncer.reconfigure(default_pool_size=4)   # rewrite the config, SIGHUP, wait
        bouncer.stop(); bouncer.start()  # down, then up again on the same port

Transaction pooling by default. Clients authenticate with `auth_type = trust` against
the users in its auth file (PgBouncer still needs to know the name), and PgBouncer logs
in to the server as the same user without a password, so the upstream must trust
127.0.0.1 (the shared test server does). The user `postgres` is its admin.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.daemon_harness import free_port

PGBOUNCER: Final = "/usr/sbin/pgbouncer"
PSQL: Final = "/usr/bin/psql"
ADMIN_USER: Final = "postgres"
START_TIMEOUT: Final = 15.0

# Settings a test may change (any other [pgbouncer] key may be given too).
DEFAULTS: Final[Mapping[str, str | int]] = {
    "pool_mode": "transaction",
    "default_pool_size": 4,
    "min_pool_size": 0,
    "reserve_pool_size": 0,
    "max_client_conn": 200,
    "max_db_connections": 0,
    # Unused in transaction pooling (PgBouncer runs it only when a session ends, and only
    # in session pooling unless server_reset_query_always is set): the daemon needs none.
    "server_reset_query": "DISCARD ALL",
    "query_wait_timeout": 120,
    # After a failed server login PgBouncer waits this long before trying again (15 s by
    # default): short, so that a test's PostgreSQL comes back promptly.
    "server_login_retry": 1,
    "server_connect_timeout": 5,
    "server_lifetime": 3600,
    "server_idle_timeout": 600,
}


class PgBouncer:
    def __init__(
        self,
        upstream: tuple[str, int],
        *,
        users: Iterable[str] = (),
        settings: Mapping[str, str | int] | None = None,
    ) -> None:
        self.upstream = upstream
        self.users = {ADMIN_USER, *users}
        self.settings: dict[str, str | int] = {**DEFAULTS, **(settings or {})}
        self.dir = Path(tempfile.mkdtemp(prefix="acode-pgbouncer-"))
        shutil.chown(self.dir, "postgres", "postgres")
        self.config = self.dir / "pgbouncer.ini"
        self.log = self.dir / "pgbouncer.log"
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    # -- the config ----------------------------------------------------------------------

    def _write(self, path: Path, text: str) -> None:
        path.write_text(text)
        shutil.chown(path, "postgres", "postgres")

    def write_config(self) -> None:
        host, port = self.upstream
        self._write(self.dir / "userlist.txt", "".join(f'"{u}" ""\n' for u in self.users))
        lines = [
            "[databases]",
            f"* = host={host} port={port}",
            "[pgbouncer]",
            "listen_addr = 127.0.0.1",
            f"listen_port = {self.port}",
            "unix_socket_dir =",
            "auth_type = trust",
            f"auth_file = {self.dir / 'userlist.txt'}",
            f"admin_users = {ADMIN_USER}",
            f"logfile = {self.log}",
            *(f"{key} = {value}" for key, value in self.settings.items()),
        ]
        self._write(self.config, "\n".join(lines) + "\n")

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Run it (in the foreground, as postgres) and wait until it listens."""
        assert self.process is None or self.process.poll() is not None, "already running"
        self.write_config()
        self.process = subprocess.Popen(
            [PGBOUNCER, str(self.config)],
            user="postgres",
            group="postgres",
            extra_groups=[],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.dir,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not self._listening():
            if self.process.poll() is not None:
                raise RuntimeError(f"pgbouncer exited ({self.process.returncode}):\n{self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"pgbouncer did not listen within {START_TIMEOUT} s")
            time.sleep(0.05)

    def _listening(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 1):
            return True
        return False

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """Gone at once (SIGKILL), as a crashed pooler: every client connection drops."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def reconfigure(self, **settings: str | int) -> None:
        """Rewrite the config with these settings, reload (SIGHUP) and wait until the
        admin console shows them."""
        self.settings.update(settings)
        self.write_config()
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)
        wanted = {key: str(value) for key, value in settings.items()}
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            shown = {row["key"]: row["value"] for row in self.show("CONFIG")}
            if all(shown.get(key) == value for key, value in wanted.items()):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"pgbouncer did not reload {wanted}: {self.tail()}")
            time.sleep(0.05)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # -- clients -------------------------------------------------------------------------

    def url(self, url: str) -> str:
        """`url` (its user and database) with PgBouncer's host and port."""
        parts = urlsplit(url)
        userinfo, at, _ = parts.netloc.rpartition("@")
        return urlunsplit(parts._replace(netloc=f"{userinfo}{at}127.0.0.1:{self.port}"))

    def admin(self, command: str) -> list[dict[str, str]]:
        """One admin console command (simple query protocol only, so through psql)."""
        where = ["-h", "127.0.0.1", "-p", str(self.port), "-U", ADMIN_USER, "-d", "pgbouncer"]
        done = subprocess.run(
            [PSQL, "--csv", "-X", *where, "-c", command],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            env={**os.environ, "PGCONNECT_TIMEOUT": "5"},
        )
        if done.returncode != 0:
            raise RuntimeError(f"pgbouncer admin {command!r}: {done.stderr.strip()}")
        return list(csv.DictReader(io.StringIO(done.stdout)))

    def show(self, what: str) -> list[dict[str, str]]:
        return self.admin(f"SHOW {what}")

    def pool(self, database: str, user: str = ADMIN_USER) -> dict[str, str]:
        """The SHOW POOLS row of one database and user ({} before its first client)."""
        for row in self.show("POOLS"):
            if (row["database"], row["user"]) == (database, user):
                return row
        return {}

    def server_connections(self, database: str) -> int:
        return sum(1 for row in self.show("SERVERS") if row["database"] == database)


def database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


@contextlib.contextmanager
def pgbouncer(
    upstream: tuple[str, int] = ("127.0.0.1", 5432),
    *,
    users: Iterable[str] = (),
    **settings: str | int,
) -> Iterator[PgBouncer]:
    """A running PgBouncer; skips the test unless root with Debian's pgbouncer."""
    if os.geteuid() != 0 or not Path(PGBOUNCER).exists() or not Path(PSQL).exists():
        pytest.skip("needs root and Debian's pgbouncer and psql (apt-get install pgbouncer)")
    bouncer = PgBouncer(upstream, users=users, settings=settings)
    try:
        bouncer.start()
        yield bouncer
    finally:
        bouncer.remove()
