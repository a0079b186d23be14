"""/healthz answers from the event loop's side: a stalled loop makes it fail, though the
HTTP thread still answers. The daemon runs in this process (a child's loop cannot be
stalled from outside without stopping every thread); the requests are real HTTP."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

from acode_sync.config import Config, DaemonSettings, MetricsSettings, PostgresSettings
from acode_sync.daemon import Daemon
from tests.daemon_harness import free_port, wait_until

pytestmark = pytest.mark.anyio


def get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port that takes connections and never answers: a PostgreSQL connect hangs."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield int(server.getsockname()[1])


async def test_a_stalled_event_loop_fails_healthz_and_readyz(
    tmp_path: Path, silent_server: int
) -> None:
    port = free_port()
    config = Config(
        postgres=PostgresSettings(
            dsn=f"postgresql://postgres@127.0.0.1:{silent_server}/acode", connect_timeout=5.0
        ),
        daemon=DaemonSettings(roots=(tmp_path / "root",), state_dir=tmp_path / "state"),
        metrics=MetricsSettings(port=port),
    )
    daemon = Daemon(config, config_path=None, environ={}, cwd=tmp_path)
    daemon.loop_stall_seconds = 1.0
    async with anyio.create_task_group() as tg:
        tg.start_soon(daemon.run)
        await anyio.to_thread.run_sync(_wait_alive, port)
        # The first probe is still waiting for the silent server.
        assert await anyio.to_thread.run_sync(get, port, "/readyz") == (
            503,
            {"status": "not ready", "reason": "PostgreSQL not contacted yet", "lag_seconds": 0},
        )

        answers: list[tuple[int, dict[str, Any]]] = []

        def ask_while_stalled() -> None:
            time.sleep(2.0)
            answers.extend([get(port, "/healthz"), get(port, "/readyz")])

        asking = threading.Thread(target=ask_while_stalled)
        asking.start()
        time.sleep(3.0)  # noqa: ASYNC251 - the point: no task of the daemon runs meanwhile
        await anyio.to_thread.run_sync(asking.join)
        assert answers[0][0] == 503
        assert answers[0][1]["status"] == "stalled"
        assert answers[0][1]["reason"].startswith("the event loop has not run for ")
        assert answers[1][0] == 503
        assert "the event loop has not run for " in answers[1][1]["reason"]

        await anyio.to_thread.run_sync(_wait_alive, port)
        assert await anyio.to_thread.run_sync(get, port, "/healthz") == (200, {"status": "ok"})
        tg.cancel_scope.cancel()


def _wait_alive(port: int) -> None:
    def alive() -> bool:
        try:
            return get(port, "/healthz")[0] == 200
        except urllib.error.URLError:  # not listening yet
            return False

    wait_until(alive, "/healthz 200")
