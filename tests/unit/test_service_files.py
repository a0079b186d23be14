"""The systemd units and the launchd plist: valid, hardened, and in step with the code."""

from __future__ import annotations

import plistlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from acode_sync.config import DaemonSettings
from acode_sync.errors import EX_CONFIG

ROOT = Path(__file__).resolve().parents[2]
UNITS = {
    "acode-syncd.service": "acode-syncd.service",
    "acode-syncd@.service": "acode-syncd@alice.service",
}
needs_systemd = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def unit_settings(name: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (ROOT / "systemd" / name).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def installed_copy(tmp_path: Path, name: str) -> Path:
    """The unit with ExecStart pointing at this environment's acode-syncd (verify checks
    that the binary exists)."""
    text = (ROOT / "systemd" / name).read_text()
    binary = Path(sys.executable).parent / "acode-syncd"
    (tmp_path / name).write_text(text.replace("/usr/bin/acode-syncd", str(binary)))
    return tmp_path / name


@pytest.mark.parametrize("name", sorted(UNITS))
def test_units_are_notify_services_that_stop_after_the_drain(name: str) -> None:
    settings = unit_settings(name)
    assert settings["Type"] == ["notify"]
    assert settings["Restart"] == ["on-failure"]
    assert settings["RestartPreventExitStatus"] == [str(EX_CONFIG)]
    assert settings["ExecReload"] == ["/usr/bin/acode-syncd reload"]
    assert settings["ExecStart"] == ["/usr/bin/acode-syncd run"]
    assert "WatchdogSec" in settings
    stop_timeout = float(settings["TimeoutStopSec"][0].rstrip("s"))
    assert stop_timeout > DaemonSettings().drain_timeout_seconds
    assert int(settings["LimitNOFILE"][0]) >= 65536


@pytest.mark.parametrize("name", sorted(UNITS))
def test_units_run_the_daemon_below_the_agents(name: str) -> None:
    settings = unit_settings(name)
    assert int(settings["Nice"][0]) > 0
    assert settings["CPUSchedulingPolicy"] == ["batch"]
    assert settings["IOSchedulingClass"] == ["best-effort"]
    assert int(settings["IOSchedulingPriority"][0]) == 7  # the lowest of its class


def test_the_template_runs_as_the_instance_user() -> None:
    assert unit_settings("acode-syncd@.service")["User"] == ["%i"]


@needs_systemd
@pytest.mark.parametrize("name", sorted(UNITS))
def test_systemd_analyze_verify_prints_nothing(name: str, tmp_path: Path) -> None:
    installed_copy(tmp_path, name)
    done = subprocess.run(
        ["systemd-analyze", "verify", UNITS[name]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


@needs_systemd
@pytest.mark.parametrize("name", sorted(UNITS))
def test_security_exposure_is_low(name: str, tmp_path: Path) -> None:
    installed_copy(tmp_path, name)
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", UNITS[name]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", done.stdout)
    assert match is not None, done.stdout + done.stderr
    assert float(match[1]) <= 2.0


def test_launch_agent_plist() -> None:
    plist = plistlib.loads((ROOT / "launchd" / "dev.acode.acode-syncd.plist").read_bytes())
    assert plist["Label"] == "dev.acode.acode-syncd"
    assert plist["ProgramArguments"][1:] == ["run"]
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False, "Crashed": True}
    assert plist["ExitTimeOut"] > DaemonSettings().drain_timeout_seconds
    assert plist["StandardOutPath"].endswith("/Library/Logs/acode-syncd.log")
    assert plist["SoftResourceLimits"]["NumberOfFiles"] >= 65536
