from __future__ import annotations

import pytest

from acode_sync.errors import SchemaMismatchError
from acode_sync.migrations import (
    AppliedMigration,
    checksum,
    latest_version,
    load_migrations,
    parse_migrations,
    plan_migrations,
)
from acode_sync.sql import parse_named_queries, queries
from acode_sync.workspace import split_statements

TWO = parse_migrations([("0002_more.sql", "SELECT 2;"), ("0001_first.sql", "SELECT 1;")])


def test_migrations_are_ordered_by_version_with_checksums() -> None:
    assert [(m.version, m.name) for m in TWO] == [(1, "first"), (2, "more")]
    assert TWO[0].checksum == checksum("SELECT 1;")
    assert latest_version(TWO) == 2
    assert latest_version(()) == 0


@pytest.mark.parametrize(
    "files",
    [
        [("1_first.sql", "")],
        [("0001-first.sql", "")],
        [("0001_a.sql", ""), ("0003_c.sql", "")],
        [("0002_b.sql", "")],
    ],
)
def test_badly_named_or_gapped_migrations_are_refused(files: list[tuple[str, str]]) -> None:
    with pytest.raises(ValueError, match="migration"):
        parse_migrations(files)


def test_plan_runs_only_what_is_missing() -> None:
    assert plan_migrations([], TWO) == list(TWO)
    assert plan_migrations([AppliedMigration(1, TWO[0].checksum)], TWO) == [TWO[1]]
    applied = [AppliedMigration(m.version, m.checksum) for m in TWO]
    assert plan_migrations(applied, TWO) == []


def test_plan_refuses_a_newer_schema() -> None:
    with pytest.raises(SchemaMismatchError, match="newer than this program"):
        plan_migrations([AppliedMigration(3, "x")], TWO)


def test_plan_refuses_an_edited_migration() -> None:
    with pytest.raises(SchemaMismatchError, match="differs"):
        plan_migrations([AppliedMigration(1, "edited")], TWO)


def test_shipped_sqlite_migrations_load() -> None:
    shipped = load_migrations("sqlite")
    assert shipped[0].version == 1
    assert all(split_statements(m.sql) for m in shipped)


def test_split_statements_keeps_trigger_bodies_whole() -> None:
    sql = """
    -- a comment
    CREATE TABLE t (x INT);
    CREATE TRIGGER tr AFTER INSERT ON t BEGIN
        INSERT INTO t VALUES (1);
        INSERT INTO t VALUES (2);
    END;
    """
    statements = split_statements(sql)
    assert len(statements) == 2
    assert statements[1].startswith("CREATE TRIGGER")
    assert statements[1].endswith("END;")
    with pytest.raises(ValueError, match="incomplete"):
        split_statements("CREATE TABLE t (x INT)")


def test_named_queries_are_parsed_and_unique() -> None:
    parsed = parse_named_queries("-- intro\n-- name: a\nSELECT 1;\n-- note\n-- name: b\nSELECT 2;")
    assert parsed == {"a": "SELECT 1;", "b": "SELECT 2;"}
    with pytest.raises(ValueError, match="twice"):
        parse_named_queries("-- name: a\nSELECT 1;\n-- name: a\nSELECT 2;")
    assert "insert_outbox" in queries("sqlite")
