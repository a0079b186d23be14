"""The macOS LaunchAgent of acode-syncd: the packaged plist template, filled in for one user.

`acode-syncd install-launchd` writes `~/Library/LaunchAgents/dev.acode.acode-syncd.plist`
from `data/dev.acode.acode-syncd.plist` (kept identical to `launchd/` in the repository).
It only writes files, so it runs (and is tested) on any system; loading the agent is left
to the `launchctl` lines it prints.
"""

from __future__ import annotations

import difflib
import math
import os
import plistlib
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from xml.sax.saxutils import escape

from acode_sync.config import (
    ENV_POSTGRES_PASSWORD,
    ENV_POSTGRES_PASSWORD_FILE,
    ENV_POSTGRES_URL,
    Config,
    find_config_file,
    load_config,
)

LABEL = "dev.acode.acode-syncd"
TEMPLATE = f"{LABEL}.plist"
EXECUTABLE = "acode-syncd"
LOG_NAME = "acode-syncd.log"
# What launchd's ExitTimeOut must leave beyond the drain and the pool's close.
EXIT_MARGIN_SECONDS = 15

_RUN = re.compile(r"^(?P<indent>[ \t]*)<string>run</string>\n", re.MULTILINE)
_EXIT_TIMEOUT = re.compile(r"(<key>ExitTimeOut</key>\s*<integer>)(\d+)(</integer>)")


class InstallError(Exception):
    """The LaunchAgent cannot be written as asked."""


def template() -> str:
    """The plist with its placeholders: @HOME@ (home directory), @BIN@ (acode-syncd's)."""
    return resources.files("acode_sync").joinpath("data", TEMPLATE).read_text(encoding="utf-8")


def agent_path(home: Path) -> Path:
    return home / "Library" / "LaunchAgents" / TEMPLATE


def log_dir(home: Path) -> Path:
    return home / "Library" / "Logs"


def launchd_environment(home: Path) -> dict[str, str]:
    """What the daemon's environment will say about its configuration under launchd: a
    LaunchAgent gets HOME, but neither ACODE_SYNC_CONFIG nor XDG_CONFIG_HOME."""
    return {"HOME": str(home)}


def absolute(path: Path | str) -> Path:
    """An absolute, normalised path that keeps its symbolic links: Homebrew's and pipx's
    bin/acode-syncd are links into a versioned directory that an upgrade replaces."""
    return Path(os.path.abspath(Path(path).expanduser()))  # noqa: PTH100 - not resolve()


def default_bin_dir() -> Path:
    """The directory of the acode-syncd being run, else the one beside this Python (a
    virtual environment's bin/), else the first on PATH."""
    script = Path(sys.argv[0])
    if script.name == EXECUTABLE and script.is_file():
        return absolute(script).parent
    beside = Path(sys.executable).parent / EXECUTABLE
    if beside.is_file():
        return beside.parent
    found = shutil.which(EXECUTABLE)
    if found is None:
        raise InstallError(f"cannot find {EXECUTABLE}: give its directory with --bin DIR")
    return absolute(found).parent


def exit_timeout(config: Config, floor: int) -> int:
    """launchd's ExitTimeOut: at least the template's, and above the drain plus the close
    of the PostgreSQL pool (which waits up to connect_timeout) with a margin."""
    needed = config.daemon.drain_timeout_seconds + config.postgres.connect_timeout
    return max(floor, math.ceil(needed) + EXIT_MARGIN_SECONDS)


def render(home: Path, bin_dir: Path, config_file: Path | None, config: Config) -> str:
    """The template filled in: paths escaped for XML, `--config FILE` after `run` when
    given, ExitTimeOut raised for a long drain. The result is checked with plistlib."""
    text = template()
    if text.count("@BIN@") != 1 or len(_RUN.findall(text)) != 1:
        raise InstallError(f"the packaged {TEMPLATE} is not the expected template")
    exit_match = _EXIT_TIMEOUT.search(text)
    if exit_match is None:
        raise InstallError(f"the packaged {TEMPLATE} has no ExitTimeOut")
    timeout = exit_timeout(config, int(exit_match[2]))
    text = _EXIT_TIMEOUT.sub(lambda m: f"{m[1]}{timeout}{m[3]}", text)
    if config_file is not None:
        text = _RUN.sub(
            lambda m: (
                f"{m[0]}{m['indent']}<string>--config</string>\n"
                f"{m['indent']}<string>{escape(str(config_file))}</string>\n"
            ),
            text,
        )
    text = text.replace("@HOME@", escape(str(home))).replace("@BIN@", escape(str(bin_dir)))
    parsed = plistlib.loads(text.encode("utf-8"))
    expected = [str(bin_dir / EXECUTABLE), "run"]
    if config_file is not None:
        expected += ["--config", str(config_file)]
    if parsed.get("Label") != LABEL or parsed.get("ProgramArguments") != expected:
        raise InstallError(f"the packaged {TEMPLATE} did not render as expected")
    return text


@dataclass(frozen=True)
class Plan:
    """What install-launchd writes, and what it found there."""

    path: Path
    text: str
    existing: str | None
    notes: tuple[str, ...] = ()

    @property
    def unchanged(self) -> bool:
        return self.existing == self.text

    def diff(self) -> str:
        return "".join(
            difflib.unified_diff(
                (self.existing or "").splitlines(keepends=True),
                self.text.splitlines(keepends=True),
                fromfile=f"{self.path} (installed)",
                tofile=f"{self.path} (new)",
            )
        )


def plan(
    bin_dir: Path | None, config_file: Path | None, environ: Mapping[str, str] | None = None
) -> Plan:
    """Render the agent for the current user (HOME) without writing anything. The
    configuration the agent will read is loaded, so an invalid one fails here
    (ACODE-DB-007) rather than in a restart loop under launchd."""
    environ = os.environ if environ is None else environ
    home = Path.home()
    binary_dir = default_bin_dir() if bin_dir is None else absolute(bin_dir)
    binary = binary_dir / EXECUTABLE
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        raise InstallError(f"{binary} is not an executable file (give --bin DIR)")
    notes: list[str] = []
    if config_file is not None:
        config_file = absolute(config_file)
    agent_env = launchd_environment(home)
    config = load_config(config_file, agent_env)
    if config_file is None:
        here = find_config_file(None, environ)
        there = find_config_file(None, agent_env)
        if here != there:
            notes.append(
                f"note: this shell's configuration is {here}, but under launchd the daemon "
                f"will read {there or 'no file (the defaults)'}; use --config {here} "
                "to pass it"
            )
    unseen = [
        name
        for name in (ENV_POSTGRES_URL, ENV_POSTGRES_PASSWORD, ENV_POSTGRES_PASSWORD_FILE)
        if environ.get(name)
    ]
    if unseen:
        notes.append(
            f"note: the daemon will not see this shell's {', '.join(unseen)}: put the "
            "setting in the configuration file (password_file for a password)"
        )
    path = agent_path(home)
    existing = path.read_text(encoding="utf-8") if path.is_file() else None
    return Plan(path, render(home, binary_dir, config_file, config), existing, tuple(notes))


def write(plan: Plan) -> None:
    """Create ~/Library/Logs and ~/Library/LaunchAgents, then write the plist (mode 0644,
    replaced atomically)."""
    log_dir(plan.path.parents[2]).mkdir(parents=True, exist_ok=True)
    plan.path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{TEMPLATE}.", dir=plan.path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(plan.text)
        Path(name).chmod(0o644)
        Path(name).replace(plan.path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


def launchctl_lines(path: Path, uid: int, *, reload: bool) -> list[str]:
    """Load the agent (it starts at once: RunAtLoad) and restart it. A loaded agent keeps
    the plist it was loaded with, so a changed file needs bootout first."""
    lines = [f"launchctl bootout gui/{uid}/{LABEL}"] if reload else []
    return [
        *lines,
        f"launchctl bootstrap gui/{uid} {path}",
        f"launchctl kickstart -k gui/{uid}/{LABEL}",
    ]
