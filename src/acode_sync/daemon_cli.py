"""`acode-syncd`: run the daemon, check its configuration, reload it, install its LaunchAgent.

Exit codes: 0 ok; 78 (EX_CONFIG) a bad configuration; 69 (EX_UNAVAILABLE) `check-config
--connect` cannot connect to PostgreSQL or found a problem there; 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from acode_sync import __version__
from acode_sync.cli import dispatch
from acode_sync.config import Config, load_config
from acode_sync.errors import ConfigError
from acode_sync.runtime import find_state_dir, read_status
from acode_sync.secret import MASK, Secret

EX_UNAVAILABLE = 69
RELOAD_TIMEOUT = 30.0
# check-config's `password` when the password comes from postgres.password_file: that one
# is set, never what it holds.
PASSWORD_FROM_FILE = f"{MASK} (from password_file)"
RELOAD_POLL = 0.1


def cmd_run(args: argparse.Namespace) -> int:
    from acode_sync.daemon import run_daemon

    return run_daemon(args.config)


def _shown(value: Any) -> Any:
    if isinstance(value, Secret):
        return MASK
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_shown(v) for v in value]
    return value


def effective_config(config: Config) -> dict[str, Any]:
    """Every setting as it will be used, secrets hidden."""
    shown: dict[str, Any] = {"source": str(config.source) if config.source else None}
    for section in ("postgres", "sync", "daemon", "metrics"):
        settings = getattr(config, section)
        shown[section] = {f.name: _shown(getattr(settings, f.name)) for f in fields(settings)}
    if config.postgres.password is None and config.postgres.password_file is not None:
        shown["postgres"]["password"] = PASSWORD_FROM_FILE
    return shown


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args.config, os.environ)
    config.postgres.resolved_password()  # a password file must be readable
    print(json.dumps(effective_config(config), indent=2))
    print("configuration is valid", file=sys.stderr)
    if not args.connect:
        return 0
    import anyio

    from acode_sync.preflight import check_postgres

    found = anyio.run(check_postgres, config.postgres, backend="asyncio")
    for line in found.passed:
        print(f"ok: {line}", file=sys.stderr)
    for line in found.problems:
        print(f"problem: {line}", file=sys.stderr)
    if found.problems:
        count = len(found.problems)
        print(f"PostgreSQL: {count} problem{'s' if count > 1 else ''}", file=sys.stderr)
        return EX_UNAVAILABLE
    print("PostgreSQL is ready for this syncer", file=sys.stderr)
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    """Send SIGHUP and wait for the daemon to say how the reload went (for ExecReload).
    An invalid file is sent too: the daemon, the judge, rejects it, logs and counts the
    rejection and keeps its configuration; the error found here is printed first."""
    directory, invalid = find_state_dir(args.config, os.environ)
    status = read_status(directory)
    if status is None:
        if invalid is not None:
            raise invalid
        print(f"acode-syncd is not running (no live status in {directory})", file=sys.stderr)
        return 1
    if invalid is not None:
        print(f"{invalid.code}: {invalid.message}", file=sys.stderr)
    generation = status["reload"]["generation"]
    os.kill(int(status["pid"]), signal.SIGHUP)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        time.sleep(RELOAD_POLL)
        status = read_status(directory)
        if status is not None and status["reload"]["generation"] > generation:
            if status["reload"]["ok"]:
                print("configuration reloaded")
                return 0
            print(
                f"reload rejected, old configuration kept: {status['reload']['error']}",
                file=sys.stderr,
            )
            return ConfigError.exit_code
    print(f"no answer from acode-syncd within {args.timeout:g} s", file=sys.stderr)
    return 1


def cmd_install_launchd(args: argparse.Namespace) -> int:
    """Write ~/Library/LaunchAgents/dev.acode.acode-syncd.plist and print how to load it."""
    from acode_sync import launchd

    try:
        plan = launchd.plan(args.bin, args.config)
    except launchd.InstallError as error:
        print(f"acode-syncd install-launchd: {error}", file=sys.stderr)
        return 1
    for note in plan.notes:
        print(note, file=sys.stderr)
    replacing = plan.existing is not None and not plan.unchanged
    if args.dry_run:
        print(plan.text, end="")
        action = "would replace" if replacing else "would write"
        print(f"# {action} {plan.path}", file=sys.stderr)
        out = sys.stderr
    elif replacing and not args.force:
        print(plan.diff(), end="", file=sys.stderr)
        print(
            f"acode-syncd install-launchd: {plan.path} exists and differs (above); "
            "run again with --force to replace it",
            file=sys.stderr,
        )
        return 1
    elif plan.unchanged:
        launchd.log_dir(Path.home()).mkdir(parents=True, exist_ok=True)
        print(f"{plan.path} is up to date")
        out = sys.stdout
    else:
        launchd.write(plan)
        print(f"{'replaced' if replacing else 'wrote'} {plan.path}")
        out = sys.stdout
    for line in launchd.launchctl_lines(plan.path, os.getuid(), reload=replacing):
        print(line, file=out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="acode-syncd",
        description="Ship workspaces' outbox records into PostgreSQL.",
    )
    parser.add_argument("--version", action="version", version=f"acode-syncd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, handler, text in (
        ("run", cmd_run, "run the daemon in the foreground (as systemd or launchd does)"),
        ("check-config", cmd_check_config, "validate and print the effective configuration"),
        ("reload", cmd_reload, "make the running daemon reload its configuration"),
    ):
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument("--config", type=Path, metavar="FILE", help="acode-syncd.toml")
        sub.set_defaults(handler=handler)
        if name == "check-config":
            sub.add_argument(
                "--connect",
                action="store_true",
                help="also connect to PostgreSQL and check its schema and the role's privileges",
            )
        if name == "reload":
            sub.add_argument("--timeout", type=float, default=RELOAD_TIMEOUT, metavar="SECONDS")
    text = "write the macOS LaunchAgent (~/Library/LaunchAgents/dev.acode.acode-syncd.plist)"
    install = commands.add_parser("install-launchd", help=text, description=text)
    install.add_argument(
        "--bin",
        type=Path,
        metavar="DIR",
        help="the directory of acode-syncd (default: that of this command)",
    )
    install.add_argument(
        "--config", type=Path, metavar="FILE", help="run the daemon with --config FILE"
    )
    install.add_argument(
        "--force", action="store_true", help="replace an existing plist that differs"
    )
    install.add_argument("--dry-run", action="store_true", help="print the plist and write nothing")
    install.set_defaults(handler=cmd_install_launchd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return dispatch(build_parser(), argv)
