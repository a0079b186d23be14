"""Versioned migrations shared by both dialects: load the numbered files, plan what to run.

Files live in `sql/<dialect>/migrations/NNNN_name.sql`. Planning is pure: it compares what
a database has applied with what this program ships and refuses a database that is newer
than the program or whose applied migrations were edited (ACODE-DB-003).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources

from acode_sync.errors import SchemaMismatchError

_FILE_NAME = re.compile(r"^(\d{4})_(\w+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str
    checksum: str


@dataclass(frozen=True, slots=True)
class AppliedMigration:
    version: int
    checksum: str


def checksum(sql: str) -> str:
    return hashlib.sha256(sql.encode()).hexdigest()


def parse_migrations(files: Iterable[tuple[str, str]]) -> tuple[Migration, ...]:
    """(file name, text) pairs -> migrations ordered by version, numbered 1..n without gaps."""
    migrations = []
    for file_name, sql in files:
        match = _FILE_NAME.match(file_name)
        if match is None:
            raise ValueError(f"migration file {file_name!r} is not named NNNN_name.sql")
        migrations.append(Migration(int(match[1]), match[2], sql, checksum(sql)))
    migrations.sort(key=lambda m: m.version)
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(migrations) + 1)):
        raise ValueError(f"migration versions must run 1..n without gaps, got {versions}")
    return tuple(migrations)


@cache
def load_migrations(dialect: str) -> tuple[Migration, ...]:
    folder = resources.files("acode_sync").joinpath("sql", dialect, "migrations")
    return parse_migrations(
        (entry.name, entry.read_text()) for entry in folder.iterdir() if entry.name.endswith(".sql")
    )


def latest_version(available: Sequence[Migration]) -> int:
    return available[-1].version if available else 0


def plan_migrations(
    applied: Iterable[AppliedMigration], available: Sequence[Migration]
) -> list[Migration]:
    """The migrations still to run, oldest first; refuse a schema this program cannot own."""
    known = {m.version: m for m in available}
    done = set()
    for migration in applied:
        shipped = known.get(migration.version)
        if shipped is None:
            raise SchemaMismatchError(
                f"schema version {migration.version} is newer than this program "
                f"(it knows up to {latest_version(available)}); nothing was written"
            )
        if shipped.checksum != migration.checksum:
            raise SchemaMismatchError(
                f"applied migration {migration.version} ({shipped.name}) differs from the "
                "file this program ships"
            )
        done.add(migration.version)
    return [m for m in available if m.version not in done]
