"""`acode db ...`: inspect and operate a workspace database.

Errors print `ACODE-DB-00N: message` and a hint on stderr, with no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from acode_sync import __version__
from acode_sync.errors import AcodeError
from acode_sync.status import workspace_status
from acode_sync.workspace import database_path, open_workspace, schema_version, translated, upgrade


def _workspace(args: argparse.Namespace) -> Path:
    return Path(args.workspace).resolve()


def cmd_migrate(args: argparse.Namespace) -> int:
    workspace = _workspace(args)
    conn = open_workspace(workspace, run_migrations=False)
    try:
        from_version, to_version = translated(
            database_path(workspace), upgrade, conn, database_path(workspace)
        )
    finally:
        conn.close()
    print(f"schema version {from_version} -> {to_version}")
    return 0


def cmd_schema_version(args: argparse.Namespace) -> int:
    conn = open_workspace(_workspace(args), create=False, run_migrations=False)
    try:
        print(schema_version(conn))
    finally:
        conn.close()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    status = workspace_status(_workspace(args))
    if args.json:
        print(json.dumps(status.as_dict(), indent=2))
    else:
        print("\n".join(status.lines()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="acode", description="Operate acode workspaces.")
    parser.add_argument("--version", action="version", version=f"acode {__version__}")
    groups = parser.add_subparsers(dest="group", required=True)

    db = groups.add_parser("db", help="the workspace database and its sync")
    db_commands = db.add_subparsers(dest="command", required=True)

    def command(
        name: str,
        handler: Callable[[argparse.Namespace], int],
        help_text: str,
        into: argparse._SubParsersAction[argparse.ArgumentParser] = db_commands,
    ) -> argparse.ArgumentParser:
        sub = into.add_parser(name, help=help_text, description=help_text)
        sub.add_argument(
            "--workspace",
            default=".",
            metavar="DIR",
            help="the workspace directory (default: the current directory)",
        )
        sub.set_defaults(handler=handler)
        return sub

    command("migrate", cmd_migrate, "create or upgrade the workspace database")
    status = command("status", cmd_status, "schema, files, row counts and the outbox backlog")
    status.add_argument("--json", action="store_true", help="print JSON for machines")

    schema = db_commands.add_parser("schema", help="the schema of the workspace database")
    schema_commands = schema.add_subparsers(dest="schema_command", required=True)
    command("version", cmd_schema_version, "print the schema version", into=schema_commands)
    return parser


def run(argv: Sequence[str] | None, parser: argparse.ArgumentParser) -> int:
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
    except AcodeError as error:
        print(f"{error.code}: {error.message}", file=sys.stderr)
        print(f"hint: {error.hint}", file=sys.stderr)
        return error.exit_code
    return code


def main(argv: Sequence[str] | None = None) -> int:
    return run(argv, build_parser())
