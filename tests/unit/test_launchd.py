"""`acode-syncd install-launchd`: the LaunchAgent it writes, on any system (it only writes
files), with HOME pointing at a temporary directory."""

from __future__ import annotations

import os
import plistlib
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from acode_sync import launchd
from acode_sync.config import DaemonSettings, PostgresSettings
from acode_sync.daemon_cli import main
from acode_sync.errors import EX_CONFIG

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home dir & co"  # a space and an XML special character
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in (
        "XDG_CONFIG_HOME",
        "ACODE_SYNC_CONFIG",
        "ACODE_POSTGRES_URL",
        "ACODE_POSTGRES_PASSWORD",
        "ACODE_POSTGRES_PASSWORD_FILE",
    ):
        monkeypatch.delenv(name, raising=False)
    return home


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "bin"
    directory.mkdir()
    binary = directory / "acode-syncd"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    return directory


def installed(home: Path) -> dict[str, Any]:
    path = home / "Library" / "LaunchAgents" / "dev.acode.acode-syncd.plist"
    result: dict[str, Any] = plistlib.loads(path.read_bytes())
    return result


def test_the_packaged_template_is_the_one_in_launchd() -> None:
    packaged = ROOT / "src" / "acode_sync" / "data" / "dev.acode.acode-syncd.plist"
    assert packaged.read_bytes() == (ROOT / "launchd" / "dev.acode.acode-syncd.plist").read_bytes()
    assert launchd.template() == packaged.read_text()


def test_install_writes_the_agent_for_this_user(
    home: Path, bin_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["install-launchd", "--bin", str(bin_dir)]) == 0
    plist = installed(home)
    assert plist["Label"] == "dev.acode.acode-syncd"
    assert plist["ProgramArguments"] == [str(bin_dir / "acode-syncd"), "run"]
    assert all(Path(arg).is_absolute() for arg in plist["ProgramArguments"][:1])
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False, "Crashed": True}
    assert plist["ExitTimeOut"] > DaemonSettings().drain_timeout_seconds
    assert plist["ExitTimeOut"] == 45  # the template's, enough for the defaults
    assert plist["WorkingDirectory"] == str(home)
    logs = home / "Library" / "Logs"
    assert plist["StandardOutPath"] == plist["StandardErrorPath"] == str(logs / "acode-syncd.log")
    assert logs.is_dir()
    text = (home / "Library" / "LaunchAgents" / "dev.acode.acode-syncd.plist").read_text()
    assert "@HOME@" not in text
    assert "@BIN@" not in text
    assert "&amp; co" in text
    mode = (home / "Library" / "LaunchAgents" / "dev.acode.acode-syncd.plist").stat().st_mode
    assert stat.S_IMODE(mode) == 0o644
    out = capsys.readouterr().out.splitlines()
    path = home / "Library" / "LaunchAgents" / "dev.acode.acode-syncd.plist"
    assert out == [
        f"wrote {path}",
        f"launchctl bootstrap gui/{os.getuid()} {path}",
        f"launchctl kickstart -k gui/{os.getuid()}/dev.acode.acode-syncd",
    ]


def test_config_adds_its_absolute_path_and_is_validated(
    home: Path, bin_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "acode-syncd.toml"
    config.write_text("[daemon]\ndrain_timeout_seconds = 60\n")
    monkeypatch.chdir(tmp_path)
    assert main(["install-launchd", "--bin", str(bin_dir), "--config", "acode-syncd.toml"]) == 0
    plist = installed(home)
    assert plist["ProgramArguments"] == [
        str(bin_dir / "acode-syncd"),
        "run",
        "--config",
        str(config),
    ]
    # ExitTimeOut follows a longer drain: drain + the pool's close + a margin.
    assert plist["ExitTimeOut"] == 60 + PostgresSettings().connect_timeout + 15

    config.write_text("[daemon]\ndrain_timeout_seconds = -1\n")
    assert main(["install-launchd", "--bin", str(bin_dir), "--config", str(config), "--force"]) == (
        EX_CONFIG
    )
    assert installed(home)["ExitTimeOut"] == 85  # unchanged


def test_an_invalid_default_configuration_is_refused(home: Path, bin_dir: Path) -> None:
    # Under launchd the daemon reads ~/.config/acode-sync/acode-syncd.toml: check that one.
    user_config = home / ".config" / "acode-sync" / "acode-syncd.toml"
    user_config.parent.mkdir(parents=True)
    user_config.write_text("[nope]\n")
    assert main(["install-launchd", "--bin", str(bin_dir)]) == EX_CONFIG
    assert not (home / "Library").exists()


def test_a_different_file_is_kept_unless_forced(
    home: Path, bin_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = home / "Library" / "LaunchAgents" / "dev.acode.acode-syncd.plist"
    path.parent.mkdir(parents=True)
    path.write_text("<plist>mine</plist>\n")
    assert main(["install-launchd", "--bin", str(bin_dir)]) == 1
    err = capsys.readouterr().err
    assert "exists and differs" in err
    assert "--force" in err
    assert "-<plist>mine</plist>" in err  # the diff
    assert path.read_text() == "<plist>mine</plist>\n"

    assert main(["install-launchd", "--bin", str(bin_dir), "--force"]) == 0
    assert installed(home)["Label"] == "dev.acode.acode-syncd"
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"replaced {path}"
    # A loaded agent keeps its old plist until it is booted out.
    assert out[1] == f"launchctl bootout gui/{os.getuid()}/dev.acode.acode-syncd"
    assert out[2].startswith("launchctl bootstrap ")

    # The same content again is no change, and needs no --force.
    assert main(["install-launchd", "--bin", str(bin_dir)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"{path} is up to date"
    assert list(path.parent.iterdir()) == [path]  # no temporary file left


def test_dry_run_prints_the_plist_and_writes_nothing(
    home: Path, bin_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["install-launchd", "--bin", str(bin_dir), "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert plistlib.loads(captured.out.encode())["WorkingDirectory"] == str(home)
    assert "# would write " in captured.err
    assert "launchctl kickstart -k gui/" in captured.err
    assert not (home / "Library").exists()


def test_a_missing_binary_is_refused(home: Path, tmp_path: Path) -> None:
    assert main(["install-launchd", "--bin", str(tmp_path)]) == 1
    assert not (home / "Library").exists()


def test_the_default_binary_is_beside_this_python(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["pytest"])
    beside = Path(sys.executable).parent / "acode-syncd"
    if not beside.is_file():
        pytest.skip("acode-syncd is not installed beside this Python")
    assert main(["install-launchd"]) == 0
    assert installed(home)["ProgramArguments"][0] == str(beside)


def test_the_running_command_is_the_default(
    home: Path, bin_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", [str(bin_dir / "acode-syncd"), "install-launchd"])
    assert launchd.default_bin_dir() == bin_dir


def test_notes_name_what_the_agent_will_not_see(
    home: Path, bin_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    xdg = tmp_path / "xdg"
    (xdg / "acode-sync").mkdir(parents=True)
    (xdg / "acode-sync" / "acode-syncd.toml").write_text("")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    monkeypatch.setenv("ACODE_POSTGRES_URL", "postgresql://db.example/acode")
    plan = launchd.plan(bin_dir, None)
    assert len(plan.notes) == 2
    assert f"use --config {xdg / 'acode-sync' / 'acode-syncd.toml'}" in plan.notes[0]
    assert "ACODE_POSTGRES_URL" in plan.notes[1]
