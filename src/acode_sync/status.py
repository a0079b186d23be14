"""`acode db status`: a read-only report on one workspace database."""

from __future__ import annotations

import shlex
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from acode_sync.domain import Clock, parse_timestamp, utc_now
from acode_sync.errors import SchemaMismatchError
from acode_sync.migrations import latest_version, load_migrations
from acode_sync.sql import queries
from acode_sync.workspace import (
    DIALECT,
    database_path,
    file_mode,
    open_workspace,
    origin_id,
    schema_version,
    translated,
)


@dataclass(frozen=True, slots=True)
class WorkspaceStatus:
    database: str
    origin_id: str
    schema_version: int
    latest_schema_version: int
    journal_mode: str
    file_mode: str
    rows: dict[str, int]
    outbox_pending: int
    outbox_dead: int
    outbox_processed: int
    oldest_pending_age_seconds: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        age = self.oldest_pending_age_seconds
        return [
            f"database:        {self.database}",
            f"origin id:       {self.origin_id}",
            f"schema version:  {self.schema_version} (latest {self.latest_schema_version})",
            f"journal mode:    {self.journal_mode}",
            f"file mode:       {self.file_mode}",
            "rows:            " + ", ".join(f"{t} {n}" for t, n in self.rows.items()),
            f"outbox:          {self.outbox_pending} pending, {self.outbox_dead} failed, "
            f"{self.outbox_processed} processed",
            "oldest pending:  " + ("none" if age is None else f"{age:.1f} s ago"),
        ]


def _collect(conn: sqlite3.Connection, path: Path, clock: Clock) -> WorkspaceStatus:
    version = schema_version(conn)
    latest = latest_version(load_migrations(DIALECT))
    if version != latest:
        # The report's queries need the current tables. (A newer schema is refused earlier,
        # when the workspace is opened.)
        workspace = shlex.quote(str(path.parent.parent))
        raise SchemaMismatchError(
            f"{path}: schema version {version}, this program reports on version {latest}",
            hint=f"Run `acode db migrate --workspace {workspace}` to upgrade it (opening it "
            "with the agent does too); status never migrates a workspace.",
        )
    q = queries(DIALECT)
    rows = {str(table): int(count) for table, count in conn.execute(q["table_counts"])}
    pending, dead, processed = conn.execute(q["outbox_counts"]).fetchone()
    oldest = conn.execute(q["oldest_pending"]).fetchone()
    age = None
    if oldest is not None:
        age = max(0.0, (clock() - parse_timestamp(oldest[0])).total_seconds())
    return WorkspaceStatus(
        database=str(path),
        origin_id=origin_id(conn),
        schema_version=version,
        latest_schema_version=latest,
        journal_mode=str(conn.execute("PRAGMA journal_mode").fetchone()[0]),
        file_mode=f"{file_mode(path):04o}",
        rows=rows,
        outbox_pending=int(pending),
        outbox_dead=int(dead),
        outbox_processed=int(processed),
        oldest_pending_age_seconds=age,
    )


def workspace_status(workspace: Path, *, clock: Clock = utc_now) -> WorkspaceStatus:
    """Read-only: an absent database is reported, not created."""
    path = database_path(workspace)
    conn = open_workspace(workspace, create=False, run_migrations=False)
    try:
        return translated(path, _collect, conn, path, clock)
    finally:
        conn.close()
