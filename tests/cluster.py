"""A private PostgreSQL 15 cluster that asks for a password (scram-sha-256), for tests of
authentication: owned by the postgres user, on a free port, removed afterwards.

    with password_cluster() as cluster:   # skips unless root with runuser and initdb
        cluster.url()                      # postgresql://postgres@127.0.0.1:PORT/postgres
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

from tests.daemon_harness import free_port

PG_BIN: Final = Path("/usr/lib/postgresql/15/bin")
CLUSTER_PASSWORD: Final = "Cluster-Pa55-7412"


class PasswordCluster:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="acode-pg-scram-"))
        self.data = self.dir / "data"
        self.port = free_port()
        shutil.chown(self.dir, "postgres", "postgres")

    def _run(self, *argv: str) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *argv],
            check=True,
            capture_output=True,
            timeout=120,
            cwd=self.dir,
        )

    def start(self) -> None:
        password_file = self.dir / "password"
        password_file.write_text(CLUSTER_PASSWORD + "\n")
        shutil.chown(password_file, "postgres", "postgres")
        self._run(
            str(PG_BIN / "initdb"),
            *("-D", str(self.data), "-A", "scram-sha-256", "-U", "postgres"),
            *(f"--pwfile={password_file}", "--no-sync", "-E", "UTF8", "--locale", "C.UTF-8"),
        )
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir}"
        self._run(
            str(PG_BIN / "pg_ctl"),
            *("-D", str(self.data), "-l", str(self.dir / "log"), "-o", options),
            *("-w", "-t", "60", "start"),
        )

    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def remove(self) -> None:
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def password_cluster() -> Iterator[PasswordCluster]:
    if os.geteuid() != 0 or shutil.which("runuser") is None or not (PG_BIN / "initdb").exists():
        pytest.skip("needs root, runuser and PostgreSQL 15's initdb to run a private cluster")
    cluster = PasswordCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()
