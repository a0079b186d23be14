"""`acode db ...`: inspect and operate a workspace database and its sync.

Errors print `ACODE-DB-00N: message` and a hint on stderr, with no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

from acode_sync import __version__, retention
from acode_sync.config import Config, load_config
from acode_sync.domain import format_timestamp
from acode_sync.errors import AcodeError, RecordRejectedError
from acode_sync.flush import DEFAULT_TIMEOUT as DEFAULT_FLUSH_TIMEOUT
from acode_sync.flush import FlushResult, flush
from acode_sync.history import maintain_history
from acode_sync.log import configure_logging
from acode_sync.outbox import list_records, replay
from acode_sync.postgres import PostgresTarget
from acode_sync.restore import RestoreRequest, Selection, parse_as_of, restore
from acode_sync.roles import grant_syncer, set_tenants
from acode_sync.runtime import find_state_dir, read_status
from acode_sync.status import workspace_status
from acode_sync.sync import WorkspaceSyncer, tune_interpreter
from acode_sync.verify import Verifier, VerifyReport
from acode_sync.workspace import (
    OpenOptions,
    database_path,
    open_workspace,
    schema_version,
    translated,
    upgrade,
)

SYNC_LOCK_WAIT = 30.0
VERIFY_DIFFERENCES = 1  # `acode db verify` found a difference
Handler = Callable[[argparse.Namespace], int]


def _workspace(args: argparse.Namespace) -> Path:
    return Path(args.workspace).resolve()


def _config(args: argparse.Namespace) -> Config:
    config = load_config(args.config, os.environ)
    password = config.postgres.resolved_password()
    configure_logging(level="info", secrets=[password] if password else [], stream=sys.stderr)
    return config


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return format_timestamp(value)
    return str(value)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=_json_default))


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def cmd_migrate(args: argparse.Namespace) -> int:
    if args.postgres:
        config = _config(args)
        from_version, to_version = anyio.run(_migrate_postgres, config, args.grant)
        print(f"PostgreSQL schema version {from_version} -> {to_version}")
        return 0
    if args.grant:
        raise RecordRejectedError(
            "--grant goes with --postgres", hint="Run `acode db migrate --postgres --grant ROLE`."
        )
    workspace = _workspace(args)
    path = database_path(workspace)
    conn = open_workspace(workspace, run_migrations=False)
    try:
        from_version, to_version = translated(path, upgrade, conn, path)
    finally:
        conn.close()
    print(f"schema version {from_version} -> {to_version}")
    return 0


async def _migrate_postgres(config: Config, grant_to: Sequence[str]) -> tuple[int, int]:
    target = PostgresTarget(config.postgres)
    try:
        versions = await target.ensure_schema(explicit=True)
        for role in grant_to:
            await grant_syncer(target, role)
            print(f"granted role {role} a syncer's rights")
        return versions
    finally:
        await target.close()


def cmd_grant(args: argparse.Namespace) -> int:
    config = _config(args)

    async def _grant() -> list[str]:
        target = PostgresTarget(config.postgres)
        try:
            return await grant_syncer(target, args.role)
        finally:
            await target.close()

    print("\n".join(anyio.run(_grant)))
    return 0


def cmd_tenants(args: argparse.Namespace) -> int:
    config = _config(args)
    enabled = args.sub == "enable"

    async def _set() -> None:
        target = PostgresTarget(config.postgres)
        try:
            await set_tenants(target, enabled=enabled)
        finally:
            await target.close()

    anyio.run(_set)
    print(f"row-level security by tenant {'on' if enabled else 'off'}")
    return 0


def cmd_history_maintain(args: argparse.Namespace) -> int:
    config = _config(args)

    async def _maintain() -> list[str]:
        target = PostgresTarget(config.postgres)
        try:
            return (await maintain_history(target)).lines()
        finally:
            await target.close()

    print("\n".join(anyio.run(_maintain)))
    return 0


def cmd_schema_version(args: argparse.Namespace) -> int:
    conn = open_workspace(_workspace(args), create=False, run_migrations=False)
    try:
        print(schema_version(conn))
    finally:
        conn.close()
    return 0


def daemon_view(
    workspace: Path, config_path: Path | None
) -> tuple[dict[str, Any] | None, str | None]:
    """What a running acode-syncd says about this workspace (from its status file), and
    the configuration file's error if it is invalid: the daemon is found anyway."""
    directory, invalid = find_state_dir(config_path, os.environ)
    config_error = None if invalid is None else f"{invalid.code}: {invalid.message}"
    status = read_status(directory)
    if status is None:
        return None, config_error
    mine = status.get("workspace_status", {}).get(str(workspace))
    last_sync = None if mine is None or mine["last_sync"] is None else mine["last_sync"]
    return {
        "pid": status["pid"],
        "postgres": status["postgres"],
        "postgres_up": status["postgres_up"],
        "watching_this_workspace": mine is not None,
        "last_sync": None
        if last_sync is None
        else datetime.fromtimestamp(last_sync, UTC).isoformat(),
        "broken": None if mine is None else mine["broken"],
    }, config_error


def cmd_status(args: argparse.Namespace) -> int:
    workspace = _workspace(args)
    status = workspace_status(workspace)
    daemon, config_error = daemon_view(workspace, args.config)
    if args.json:
        _print_json({**status.as_dict(), "daemon": daemon, "config_error": config_error})
        return 0
    print("\n".join(status.lines()))
    if config_error is not None:
        print(f"config:          invalid: {config_error}")
    if daemon is None:
        print("daemon:          not running (or not for this configuration)")
        return 0
    up = {True: "up", False: "down", None: "unknown"}[daemon["postgres_up"]]
    watched = "watching this workspace" if daemon["watching_this_workspace"] else "not watching it"
    print(f"daemon:          pid {daemon['pid']}, {watched}, PostgreSQL {daemon['postgres']} {up}")
    print(f"last sync:       {daemon['last_sync'] or 'never'}")
    if daemon["broken"]:
        print(f"broken:          {daemon['broken']}")
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    config = _config(args)

    async def _sync() -> str:
        target = PostgresTarget(config.postgres)
        try:
            syncer = WorkspaceSyncer(
                workspace=_workspace(args), target=target, settings=config.sync
            )
            summary = await syncer.drain(
                lock_wait=SYNC_LOCK_WAIT, max_batches=1 if args.once else None
            )
        finally:
            await target.close()
        return summary.line()

    tune_interpreter()
    print(anyio.run(_sync))
    return 0


def _open_existing(args: argparse.Namespace) -> Any:
    return open_workspace(_workspace(args), OpenOptions(), create=False, run_migrations=False)


def cmd_outbox_list(args: argparse.Namespace) -> int:
    conn = _open_existing(args)
    try:
        path = database_path(_workspace(args))
        records = translated(path, list_records, conn, failed_only=args.failed, limit=args.limit)
    finally:
        conn.close()
    if args.json:
        _print_json(records)
        return 0
    for r in records:
        error = f"  {r['last_error']}" if r["last_error"] else ""
        print(
            f"{r['outbox_id']:>8}  {r['state']:<7}  attempts {r['attempts']:>2}  "
            f"{r['idempotency_key']}{error}"
        )
    return 0


def cmd_outbox_retry(args: argparse.Namespace) -> int:
    if bool(args.ids) == bool(args.all_failed):
        raise RecordRejectedError(
            "give outbox ids or --all-failed, not both or neither",
            hint="List the dead letters with `acode db outbox list --failed`, then replay them "
            "by id (`acode db outbox retry ID...`) or all at once (`--all-failed`).",
        )
    conn = _open_existing(args)
    try:
        path = database_path(_workspace(args))
        count = translated(path, replay, conn, None if args.all_failed else args.ids)
    finally:
        conn.close()
    print(f"{count} record(s) queued again")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    """The central retention, as the daemon runs it hourly: for the schema's owner when
    the daemons' role does not own the tables (docs/postgres.md#retention)."""
    config = _config(args)

    async def _prune() -> list[tuple[str, float | None, int]]:
        target = PostgresTarget(config.postgres)
        done = []
        try:
            for table, days in retention.plans(config.sync):
                before = retention.cutoff(days, datetime.now(UTC))
                done.append((table.table, days, await target.prune(table, before)))
        finally:
            await target.close()
        return done

    for table, days, forgotten in anyio.run(_prune):
        if days is None:
            print(f"{table}: kept forever; partitions made ahead")
        else:
            print(f"{table}: {forgotten} row(s) older than {days:g} days forgotten")
    return 0


def cmd_conflicts_list(args: argparse.Namespace) -> int:
    config = _config(args)

    async def _list() -> list[dict[str, Any]]:
        target = PostgresTarget(config.postgres)
        try:
            rows = await target.list_conflicts(args.session, args.limit)
        finally:
            await target.close()
        for row in rows:  # jsonb arrives as text
            for key in ("incoming_version", "current_version"):
                row[key] = json.loads(row[key])
        return rows

    conflicts = anyio.run(_list)
    if args.json:
        _print_json(conflicts)
        return 0
    for c in conflicts:
        print(
            f"{c['conflict_id']:>6}  {c['entity_type']} {c['entity_id']}  winner {c['winner']}\n"
            f"        incoming {c['incoming_key']} from {c['incoming_origin']}\n"
            f"        current  {c['current_key']} from {c['current_origin']}"
        )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    config = _config(args)

    async def _verify() -> VerifyReport:
        target = PostgresTarget(config.postgres)
        try:
            verifier = Verifier(
                workspace=_workspace(args), target=target, busy_timeout=config.sync.busy_timeout
            )
            return await verifier.run(repair=args.repair)
        finally:
            await target.close()

    report = anyio.run(_verify)
    if args.json:
        _print_json(report.as_dict())
    else:
        print("\n".join(report.lines()))
    return 0 if report.ok else VERIFY_DIFFERENCES


def cmd_flush(args: argparse.Namespace) -> int:
    config = _config(args)

    async def _flush() -> FlushResult:
        target = PostgresTarget(config.postgres)
        try:
            return await flush(_workspace(args), target, config.sync, max_wait=args.timeout)
        finally:
            await target.close()

    tune_interpreter()
    print(anyio.run(_flush).line())
    return 0


def positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value


def add_recovery_commands(commands: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    verify = command(
        commands, "verify", cmd_verify, "compare the workspace with PostgreSQL", config=True
    )
    verify.add_argument("--json", action="store_true", help="print JSON for machines")
    verify.add_argument(
        "--repair",
        action="store_true",
        help="queue what PostgreSQL lacks (missing or stale) as outbox records",
    )
    flush_parser = command(
        commands,
        "flush",
        cmd_flush,
        "wait until every record committed so far is in PostgreSQL",
        config=True,
    )
    flush_parser.add_argument(
        "--timeout",
        type=positive_seconds,
        default=DEFAULT_FLUSH_TIMEOUT,
        metavar="S",
        help=f"give up after S seconds (default {DEFAULT_FLUSH_TIMEOUT:g})",
    )


def cmd_restore(args: argparse.Namespace) -> int:
    config = _config(args)
    as_of = None if args.as_of is None else parse_as_of(args.as_of)
    selection = Selection(session_ids=tuple(args.session or ()), origin=args.origin, as_of=as_of)
    request = RestoreRequest(_workspace(args), selection)
    on_terminal = sys.stderr.isatty()

    def progress(done: int) -> None:
        print(f"\rrestoring: {done} entities read", end="", file=sys.stderr, flush=True)

    try:
        report = anyio.run(
            lambda: restore(config.postgres, request, progress=progress if on_terminal else None)
        )
    finally:
        if on_terminal:
            print(file=sys.stderr)
    if args.json:
        _print_json(report.as_dict())
    else:
        print("\n".join(report.lines()))
    return 0


def add_restore_command(commands: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    sub = command(
        commands,
        "restore",
        cmd_restore,
        "rebuild run state from PostgreSQL into this workspace",
        config=True,
    )
    chosen = sub.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--session", nargs="+", metavar="ID", help="these sessions")
    chosen.add_argument("--origin", metavar="ORIGIN", help="every entity this origin wrote")
    chosen.add_argument("--all", action="store_true", help="everything PostgreSQL holds")
    sub.add_argument(
        "--as-of",
        metavar="TIME",
        help="the state at this RFC 3339 time, from the version history ([postgres] keep_history)",
    )
    sub.add_argument("--json", action="store_true", help="print JSON for machines")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="acode", description="Operate acode workspaces.")
    parser.add_argument("--version", action="version", version=f"acode {__version__}")
    groups = parser.add_subparsers(dest="group", required=True)
    db = groups.add_parser("db", help="the workspace database and its sync")
    commands = db.add_subparsers(dest="command", required=True)

    def command(
        into: Any, name: str, handler: Handler, text: str, *, config: bool = False
    ) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = into.add_parser(name, help=text, description=text)
        sub.add_argument(
            "--workspace",
            default=".",
            metavar="DIR",
            help="the workspace directory (default: the current directory)",
        )
        if config:
            sub.add_argument("--config", type=Path, metavar="FILE", help="acode-syncd.toml")
        sub.set_defaults(handler=handler)
        return sub

    migrate = command(
        commands, "migrate", cmd_migrate, "create or upgrade the database", config=True
    )
    migrate.add_argument(
        "--postgres", action="store_true", help="migrate the PostgreSQL schema instead"
    )
    migrate.add_argument(
        "--grant",
        action="append",
        default=[],
        metavar="ROLE",
        help="then give ROLE a syncer's rights (with --postgres; may be repeated)",
    )
    grant = command(
        commands, "grant", cmd_grant, "give a PostgreSQL role a syncer's rights", config=True
    )
    grant.add_argument("role", metavar="ROLE", help="an existing PostgreSQL role")
    tenants = commands.add_parser("tenants", help="row-level security by tenant in PostgreSQL")
    tenants_commands = tenants.add_subparsers(dest="sub", required=True)
    for action, text in (
        ("enable", "each role writes only its own tenant's rows"),
        ("disable", "every syncer role may write every row again"),
    ):
        command(tenants_commands, action, cmd_tenants, text, config=True)
    history = commands.add_parser("history", help="the version history in PostgreSQL")
    command(
        history.add_subparsers(dest="sub", required=True),
        "maintain",
        cmd_history_maintain,
        "create the coming partitions, drop those past the retention",
        config=True,
    )
    status = command(
        commands, "status", cmd_status, "schema, files, rows, backlog, daemon", config=True
    )
    status.add_argument("--json", action="store_true", help="print JSON for machines")
    sync = command(commands, "sync", cmd_sync, "ship pending records now", config=True)
    sync.add_argument("--once", action="store_true", help="ship one batch at most")

    schema = commands.add_parser("schema", help="the schema of the workspace database")
    command(
        schema.add_subparsers(dest="sub", required=True),
        "version",
        cmd_schema_version,
        "print the schema version",
    )

    outbox = commands.add_parser("outbox", help="pending and dead-lettered records")
    outbox_commands = outbox.add_subparsers(dest="sub", required=True)
    listing = command(outbox_commands, "list", cmd_outbox_list, "list pending and failed records")
    listing.add_argument("--failed", action="store_true", help="only dead letters")
    listing.add_argument("--json", action="store_true", help="print JSON for machines")
    listing.add_argument("--limit", type=positive_int, default=1000)
    retry = command(outbox_commands, "retry", cmd_outbox_retry, "replay dead-lettered records")
    retry.add_argument("ids", nargs="*", type=int, metavar="ID", help="outbox ids to replay")
    retry.add_argument("--all-failed", action="store_true", help="replay every dead letter")

    conflicts = commands.add_parser("conflicts", help="conflicts recorded in PostgreSQL")
    conflicts_list = command(
        conflicts.add_subparsers(dest="sub", required=True),
        "list",
        cmd_conflicts_list,
        "list recorded conflicts, newest first",
        config=True,
    )
    conflicts_list.add_argument("--session", metavar="ID", help="only this session's")
    conflicts_list.add_argument("--json", action="store_true", help="print JSON for machines")
    conflicts_list.add_argument("--limit", type=positive_int, default=100)
    command(
        commands,
        "prune",
        cmd_prune,
        "drop PostgreSQL's expired partitions (applied keys, conflicts), make the coming ones",
        config=True,
    )
    add_recovery_commands(commands, command)
    add_restore_command(commands, command)
    return parser


def dispatch(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Run the chosen command; an ACODE-DB error becomes its message, a hint and an exit
    status, never a traceback. Shared by `acode` and `acode-syncd`."""
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
    except AcodeError as error:
        print(f"{error.code}: {error.message}", file=sys.stderr)
        print(f"hint: {error.hint}", file=sys.stderr)
        return error.exit_code
    return code


def main(argv: Sequence[str] | None = None) -> int:
    return dispatch(build_parser(), argv)
