"""packaging/Dockerfile, checked without docker (which cannot run here): its instructions
are read and validated, and its ENTRYPOINT runs as a real process, with the image's
environment and configuration, as the container would run it without systemd."""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import tomllib
import urllib.request
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

import pytest

from acode_sync import metrics
from acode_sync.config import read_config_file
from tests.daemon_harness import (
    BIN,
    WAIT,
    child_env,
    free_port,
    pg_count,
    save_sessions,
    wait_until,
)

ROOT: Final = Path(__file__).resolve().parents[2]
DOCKERFILE: Final = ROOT / "packaging" / "Dockerfile"
# The /healthz endpoint of the metrics listener, which the HEALTHCHECK asks.
SERVES_HEALTHZ: Final = "/healthz" in Path(metrics.__file__).read_text()


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str

    def exec_form(self) -> list[str]:
        """The JSON array of an exec-form ENTRYPOINT, CMD or HEALTHCHECK CMD."""
        text = self.arguments
        if self.keyword == "HEALTHCHECK":  # HEALTHCHECK [--option=value ...] CMD [...]
            text = text.partition(" CMD ")[2]
        value = json.loads(text)
        assert isinstance(value, list)
        assert all(isinstance(v, str) for v in value)
        return value


@cache
def instructions() -> tuple[Instruction, ...]:
    """The Dockerfile's instructions, comments dropped and `\\` continuations joined."""
    found, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.strip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, arguments = pending.partition(" ")
        found.append(Instruction(keyword.upper(), re.sub(r"\s+", " ", arguments).strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return tuple(found)


def the(keyword: str) -> Instruction:
    matching = [i for i in instructions() if i.keyword == keyword]
    assert len(matching) == 1, f"{len(matching)} {keyword} instructions"
    return matching[0]


def container_config_source() -> tuple[Path, str]:
    """The repository file the image installs as the ENTRYPOINT's --config, and where."""
    entrypoint = the("ENTRYPOINT").exec_form()
    target = entrypoint[entrypoint.index("--config") + 1]
    for copy in (i for i in instructions() if i.keyword == "COPY"):
        *sources, destination = shlex.split(copy.arguments)
        if destination == target:
            (source,) = sources
            return ROOT / source, target
    raise AssertionError(f"no COPY installs {target}")


def test_the_instructions_are_known_and_their_sources_exist() -> None:
    known = {"FROM", "ENV", "COPY", "RUN", "USER", "VOLUME", "EXPOSE", "STOPSIGNAL"}
    known |= {"HEALTHCHECK", "ENTRYPOINT"}
    assert next(i.keyword for i in instructions()) == "FROM"
    assert {i.keyword for i in instructions()} <= known
    for copy in (i for i in instructions() if i.keyword == "COPY"):
        *sources, _ = shlex.split(copy.arguments)
        assert not [s for s in sources if s.startswith("--")], "COPY with options"
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"


def test_the_base_image_is_the_python_the_package_is_built_for() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    floor = pyproject["project"]["requires-python"].removeprefix(">=")
    # Debian 12 (bookworm), with the CPython minor of the .deb (packaging/README.md).
    assert the("FROM").arguments == f"python:{floor}-slim-bookworm"


def test_it_runs_as_a_user_who_is_not_root() -> None:
    user, _, group = the("USER").arguments.partition(":")
    assert user.isdigit()
    assert int(user) != 0
    assert group.isdigit()
    assert int(group) != 0


def test_the_entrypoint_runs_the_daemon_in_the_foreground_on_the_image_config() -> None:
    entrypoint = the("ENTRYPOINT").exec_form()
    assert entrypoint[:2] == ["acode-syncd", "run"]
    source, target = container_config_source()
    assert target == "/etc/acode-sync/acode-syncd.toml"
    config = read_config_file(source)
    assert config.daemon.roots == (Path(json.loads(the("VOLUME").arguments)[0]),)
    assert config.daemon.state_dir is not None
    assert config.daemon.state_dir.is_absolute()
    assert (config.metrics.address, config.metrics.port) == ("0.0.0.0", 9464)
    assert the("EXPOSE").arguments == str(config.metrics.port)
    assert the("STOPSIGNAL").arguments == "SIGTERM"
    # No secret in the image: the server and the password come from the environment.
    assert "dsn" not in tomllib.loads(source.read_text()).get("postgres", {})
    assert "PASSWORD" not in " ".join(i.arguments for i in instructions() if i.keyword == "ENV")


def test_the_healthcheck_asks_healthz_on_the_metrics_port() -> None:
    healthcheck = the("HEALTHCHECK")
    command = healthcheck.exec_form()
    assert command[:2] == ["python", "-c"]
    (url,) = re.findall(r"http://[^'\"]+", command[2])
    parts = urlsplit(url)
    config = read_config_file(container_config_source()[0])
    assert (parts.hostname, parts.port, parts.path) == (
        "127.0.0.1",
        config.metrics.port,
        "/healthz",
    )
    timeout = re.search(r"--timeout=(\d+)s", healthcheck.arguments)
    assert timeout is not None
    assert int(re.findall(r"timeout=(\d+)\)", command[2])[0]) < int(timeout[1])


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in (i for i in instructions() if i.keyword == "ENV"):
        for pair in shlex.split(instruction.arguments):
            key, _, value = pair.partition("=")
            env[key] = value
    return env


@pytest.mark.postgres
@pytest.mark.processes
def test_the_entrypoint_ships_a_workspace_and_stops_on_sigterm(tmp_path: Path, pg_url: str) -> None:
    """The container's process, minus the container: its command, its environment, its
    configuration (only the paths and the port moved into the test's directory)."""
    source, target = container_config_source()
    config = read_config_file(source)
    port = free_port()
    root, state = tmp_path / "workspaces", tmp_path / "state"
    text = source.read_text()
    for old, new in (
        (f'"{config.daemon.roots[0]}"', json.dumps(str(root))),
        (f'"{config.daemon.state_dir}"', json.dumps(str(state))),
        ('"0.0.0.0"', '"127.0.0.1"'),
        (f"port = {config.metrics.port}", f"port = {port}"),
    ):
        assert old in text
        text = text.replace(old, new)
    moved = tmp_path / "acode-syncd.toml"
    moved.write_text(text)
    workspace = root / "project"
    workspace.mkdir(parents=True)
    save_sessions(workspace, 3)

    argv = [str(moved) if arg == target else arg for arg in the("ENTRYPOINT").exec_form()]
    argv[0] = str(BIN / argv[0])
    env = child_env(**image_env(), ACODE_POSTGRES_URL=pg_url)
    log = tmp_path / "daemon.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env
        )
    try:
        wait_until(lambda: pg_count(pg_url, "sessions") == 3, "the 3 sessions in PostgreSQL")
        assert process.poll() is None, "the daemon left the foreground"
        if SERVES_HEALTHZ:
            healthcheck = the("HEALTHCHECK").exec_form()
            script = healthcheck[2].replace(f":{config.metrics.port}/", f":{port}/")
            done = subprocess.run([BIN / "python", "-c", script], env=env, timeout=10, check=False)
            assert done.returncode == 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert b"acode_sync_" in response.read()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=WAIT) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert lines, "no JSON log lines on stdout/stderr"
    assert "Traceback" not in log.read_text()
