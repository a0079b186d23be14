"""Run the real `acode-syncd` as a child process, as systemd would, and watch it.

    with NotifySocket() as notify:
        daemon = DaemonProcess.start(config_path, notify=notify, workdir=tmp_path)
        notify.wait_for("READY=1")
        ...
        daemon.close()   # SIGKILL if still running, files closed

The notify socket is a UNIX datagram socket in the abstract namespace (no path-length
limit) read by a background thread: the daemon's sd_notify calls are blocking sends,
so an unread socket would end up stalling the daemon. Every datagram is kept.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, TypeVar

import anyio
import asyncpg
from prometheus_client.parser import text_string_to_metric_families

from acode_sync.domain import Session, format_timestamp, idempotency_key, stamped, utc_now
from acode_sync.sql import queries
from acode_sync.store import WorkspaceDatabase, encode_json, outbox_row
from acode_sync.workspace import database_path
from tests.pg import COUNT_APPLIED_VERSIONS

BIN: Final = Path(sys.executable).parent
SYNCD: Final = str(BIN / "acode-syncd")
ACODE: Final = str(BIN / "acode")
WAIT: Final = 20.0  # generous: every wait is for an event, never a speed check
POLL: Final = 0.1
T = TypeVar("T")

# Variables of the test's own environment that would change what the child reads.
_CLEARED_ENV: Final = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "ACODE_POSTGRES_URL",
    "ACODE_POSTGRES_PASSWORD",
    "ACODE_POSTGRES_PASSWORD_FILE",
    "ACODE_SYNC_CONFIG",
    "RUNTIME_DIRECTORY",
)


def free_port() -> int:
    """A TCP port nothing listens on now (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    condition: Callable[[], T | None], what: str, timeout: float = WAIT, interval: float = POLL
) -> T:
    """Poll until condition() is truthy; return its value or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _CLEARED_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


# --------------------------------------------------------------------------- config


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {type(value).__name__}")


def render_toml(sections: Mapping[str, Mapping[str, Any]]) -> str:
    lines: list[str] = []
    for name, table in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in table.items()]
        lines.append("")
    return "\n".join(lines)


def daemon_config(
    *,
    dsn: str,
    roots: Sequence[Path],
    state_dir: Path,
    metrics_port: int,
    postgres: Mapping[str, Any] | None = None,
    sync: Mapping[str, Any] | None = None,
    daemon: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Settings for a test daemon: fast rescans, short retries, a fixed metrics port."""
    return {
        "postgres": {"dsn": dsn, "connect_timeout": 5.0, "statement_timeout": 10.0}
        | dict(postgres or {}),
        "sync": {"busy_timeout": 5.0} | dict(sync or {}),
        "daemon": {
            "roots": [str(r) for r in roots],
            "max_depth": 2,
            "rescan_seconds": 0.5,
            "sweep_seconds": 1.0,
            "broken_retry_seconds": 1.0,
            "drain_timeout_seconds": 15.0,
            "state_dir": str(state_dir),
            "log_format": "json",
        }
        | dict(daemon or {}),
        "metrics": {"address": "127.0.0.1", "port": metrics_port},
    }


def write_config(path: Path, sections: Mapping[str, Mapping[str, Any]]) -> Path:
    path.write_text(render_toml(sections))
    return path


# --------------------------------------------------------------------------- sd_notify


class NotifySocket:
    """The test's end of NOTIFY_SOCKET: every datagram, in arrival order."""

    def __init__(self) -> None:
        self.name = f"acode-test-{os.getpid()}-{secrets.token_hex(6)}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind("\0" + self.name)
        self._sock.settimeout(0.1)
        self._messages: list[str] = []
        self._changed = threading.Condition()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._read, name="notify-socket", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        """NOTIFY_SOCKET's value: '@' names an abstract socket."""
        return "@" + self.name

    def _read(self) -> None:
        while not self._closing.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._changed:
                self._messages.append(data.decode())
                self._changed.notify_all()

    @property
    def messages(self) -> list[str]:
        with self._changed:
            return list(self._messages)

    def count(self, text: str, start: int = 0) -> int:
        return sum(1 for m in self.messages[start:] if text in m.split("\n"))

    def wait_for(self, text: str, *, start: int = 0, timeout: float = WAIT) -> int:
        """Index of the first datagram from `start` on with a line containing `text`."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for index in range(start, len(self._messages)):
                    lines = self._messages[index].split("\n")
                    if any(text in line for line in lines):
                        return index
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"no {text!r} datagram within {timeout:g} s; got {self._messages[start:]}"
                    )
                self._changed.wait(remaining)

    def wait_count(self, text: str, count: int, *, start: int = 0, timeout: float = WAIT) -> None:
        wait_until(lambda: self.count(text, start) >= count, f"{count} x {text!r}", timeout)

    def close(self) -> None:
        self._closing.set()
        self._thread.join(5)
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --------------------------------------------------------------------------- the daemon


class DaemonProcess:
    """`acode-syncd run --config FILE` with stdout/stderr in files."""

    def __init__(self, process: subprocess.Popen[bytes], stdout: Path, stderr: Path) -> None:
        self.process = process
        self.stdout_path = stdout
        self.stderr_path = stderr

    @classmethod
    def start(
        cls,
        config: Path,
        *,
        notify: NotifySocket,
        workdir: Path,
        watchdog_usec: int = 400_000,
        name: str = "daemon",
        extra_env: Mapping[str, str] | None = None,
    ) -> DaemonProcess:
        stdout, stderr = workdir / f"{name}.stdout", workdir / f"{name}.stderr"
        env = child_env(
            NOTIFY_SOCKET=notify.address, WATCHDOG_USEC=str(watchdog_usec), **(extra_env or {})
        )
        with stdout.open("wb") as out, stderr.open("wb") as err:
            process = subprocess.Popen(
                [SYNCD, "run", "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                cwd=workdir,
            )
        return cls(process, stdout, stderr)

    @property
    def pid(self) -> int:
        return self.process.pid

    def signal(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = WAIT) -> int:
        return self.process.wait(timeout)

    def running(self) -> bool:
        return self.process.poll() is None

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def events(self) -> list[dict[str, Any]]:
        """Every JSON log line so far (a partial last line is left for later)."""
        found = []
        for line in self.stdout().splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    found.append(event)
        return found

    def find(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events()
            if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
        ]

    def wait_log(self, event: str, timeout: float = WAIT, **fields: Any) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            if not self.running():
                raise AssertionError(
                    f"acode-syncd exited ({self.process.returncode}) before logging {event!r}:\n"
                    f"{self.stdout()[-3000:]}\n{self.stderr()[-3000:]}"
                )
            matches = self.find(event, **fields)
            return matches[0] if matches else None

        return wait_until(found, f"log event {event!r} {fields or ''}", timeout)

    def assert_no_traceback(self) -> None:
        assert "Traceback" not in self.stderr(), self.stderr()
        assert "Traceback" not in self.stdout(), self.stdout()[-5000:]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


# --------------------------------------------------------------------------- helpers


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body: bytes = response.read()
    return body.decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition: (name, sorted labels) -> value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): float(s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, tuple(sorted(labels.items()))))


def records_applied(port: int) -> float:
    """acode_sync_records_total{result="applied"} of the daemon on that metrics port."""
    return sample(scrape(port), "acode_sync_records_total", result="applied") or 0.0


def run_cli(*argv: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        env=dict(env) if env is not None else child_env(),
        timeout=60,
        check=False,
    )


def pg_fetchval(url: str, sql: str, *args: Any) -> Any:
    """One value from PostgreSQL (search_path acode); None while the schema is missing."""

    async def fetch() -> Any:
        conn = await asyncpg.connect(url, server_settings={"search_path": "acode"})
        try:
            return await conn.fetchval(sql, *args)
        except (asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError):
            return None
        finally:
            await conn.close()

    return anyio.run(fetch)


def pg_execute(url: str, sql: str) -> None:
    async def execute() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    anyio.run(execute)


def pg_count(url: str, table: str) -> int:
    return int(pg_fetchval(url, f"SELECT count(*) FROM {table}") or 0)


def pg_applied(url: str) -> int:
    """How many versions PostgreSQL applied (tests.pg.APPLIED_VERSION_KEYS)."""
    return int(pg_fetchval(url, COUNT_APPLIED_VERSIONS) or 0)


def save_sessions(workspace: Path, count: int, title: str = "e2e") -> list[str]:
    """Save `count` sessions through the store (creating the workspace); their ids."""
    workspace.mkdir(parents=True, exist_ok=True)
    db = WorkspaceDatabase(workspace)
    try:
        return [db.save(Session(title=f"{title} {n}")).session_id for n in range(count)]
    finally:
        db.close()


_SQLITE = queries("sqlite")


def seed_sessions(workspace: Path, count: int) -> None:
    """Many new sessions fast: rows and outbox records as the store writes them, in one
    transaction (the store's one-transaction-per-save is too slow for 20k)."""
    workspace.mkdir(parents=True, exist_ok=True)
    WorkspaceDatabase(workspace).close()
    base = utc_now() - timedelta(hours=1)
    rows, outbox = [], []
    for n in range(count):
        stamp = format_timestamp(base + timedelta(microseconds=n))
        session = stamped(Session(title=f"seeded {n}"), created_at=stamp, updated_at=stamp)
        row = session.row()
        outbox.append(
            outbox_row(
                idempotency_key(session.entity_type, session.entity_id, stamp),
                session.entity_type,
                session.entity_id,
                session.session_id,
                encode_json(row),
                None,
                stamp,
            )
        )
        rows.append(row)
    conn = sqlite3.connect(database_path(workspace), isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(_SQLITE["save_sessions"], rows)
        conn.executemany(_SQLITE["insert_outbox"], outbox)
        conn.execute("COMMIT")
    finally:
        conn.close()


def outbox_counts(workspace: Path) -> dict[str, int]:
    conn = sqlite3.connect(database_path(workspace))
    try:
        return {
            str(state): int(n)
            for state, n in conn.execute("SELECT state, count(*) FROM outbox GROUP BY state")
        }
    finally:
        conn.close()


# --------------------------------------------------------------------------- forwarder


class Forwarder:
    """A TCP forwarder on a fixed port, started on demand: before `start()` nothing
    listens there (connections are refused), after it every connection is piped to
    `upstream`."""

    def __init__(self, port: int, upstream: tuple[str, int] = ("127.0.0.1", 5432)) -> None:
        self.port = port
        self.upstream = upstream
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()

    def start(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.1)
        self._spawn(self._accept)

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _keep(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._keep(client)
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            self._keep(upstream)
            self._spawn(self._pump, client, upstream)
            self._spawn(self._pump, upstream, client)

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closing.set()
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in threads:
            thread.join(5)


@contextlib.contextmanager
def forwarder(port: int) -> Iterator[Forwarder]:
    forward = Forwarder(port)
    try:
        yield forward
    finally:
        forward.close()
