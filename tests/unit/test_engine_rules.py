from __future__ import annotations

import io
import json

import asyncpg
import pytest

from acode_sync.log import Redactor, configure_logging, get_logger
from acode_sync.pg_tables import (
    APPLY_ROUND_SQL,
    ARGUMENTS_PER_TABLE,
    ENTITY_TYPES,
    FIRST_TABLE_ARGUMENT,
    TABLES,
    history_argument,
    round_sql,
)
from acode_sync.postgres import (
    LOCK_NAMESPACE,
    PreparedRecord,
    batch_opening,
    is_entity_race,
    is_record_error,
    lock_key,
    plan_batch,
    rounds,
    session_is_the_records,
)


def record(n: int, entity: str) -> PreparedRecord:
    return PreparedRecord(n, f"k{n}", "Session", entity, None, b"{}", "v", None, b"")


def test_rounds_hold_one_record_per_entity_in_order() -> None:
    records = [record(1, "a"), record(2, "b"), record(3, "a"), record(4, "a"), record(5, "c")]
    assert [[r.outbox_id for r in batch] for batch in rounds(records)] == [[1, 2, 5], [3], [4]]
    assert rounds([]) == []


def test_lock_keys_are_stable_32_bit() -> None:
    assert lock_key("sess_1") == lock_key("sess_1")
    assert -(2**31) <= lock_key("sess_1") < 2**31


def test_errors_are_classified_by_sqlstate_class() -> None:
    assert is_record_error(asyncpg.exceptions.UntranslatableCharacterError())
    assert is_record_error(asyncpg.exceptions.CheckViolationError())
    assert is_record_error(asyncpg.exceptions.ProgramLimitExceededError())
    assert is_record_error(UnicodeEncodeError("utf-8", "x", 0, 1, "bad"))
    assert not is_record_error(asyncpg.exceptions.ConnectionDoesNotExistError())
    assert not is_record_error(asyncpg.exceptions.SerializationError())
    assert not is_record_error(asyncpg.exceptions.TooManyConnectionsError())
    assert not is_record_error(asyncpg.exceptions.AdminShutdownError())
    assert not is_record_error(asyncpg.exceptions.UndefinedTableError())
    assert not is_record_error(OSError("refused"))
    assert not is_record_error(TimeoutError())


def test_the_round_statement_writes_every_table_with_its_own_arguments() -> None:
    for spec in TABLES.values():
        assert f"INSERT INTO acode.{spec.table} AS t" in APPLY_ROUND_SQL
    last = FIRST_TABLE_ARGUMENT - 1 + ARGUMENTS_PER_TABLE * len(TABLES)
    assert f"${last}::" in APPLY_ROUND_SQL
    assert f"${last + 1}" not in APPLY_ROUND_SQL


def test_a_round_names_only_the_tables_of_its_records() -> None:
    sql = round_sql(("SessionEvent", "ToolCall"), history=True)
    written = {
        spec.table for spec in TABLES.values() if f"INSERT INTO acode.{spec.table} AS" in sql
    }
    assert written == {"session_events", "tool_calls"}
    retention = history_argument(("SessionEvent", "ToolCall"))
    assert retention == FIRST_TABLE_ARGUMENT + 2 * ARGUMENTS_PER_TABLE
    assert f"${retention}::interval" in sql
    assert f"${retention + 1}" not in sql
    assert len(sql) < len(APPLY_ROUND_SQL) / 2


@pytest.mark.parametrize("entity_types", [(), ("ToolCall", "Session"), ("Nope",)])
def test_a_round_statement_takes_known_types_in_their_order(
    entity_types: tuple[str, ...],
) -> None:
    with pytest.raises(ValueError, match="ENTITY_TYPES order"):
        round_sql(entity_types, history=False)


def test_a_batch_plan_sends_arguments_only_for_the_types_present() -> None:
    def of(n: int, entity_type: str, entity: str) -> PreparedRecord:
        return PreparedRecord(n, f"k{n}", entity_type, entity, "s", b"{}", "v", None, b"")

    plan = plan_batch([of(1, "ToolCall", "t1"), of(2, "Session", "s"), of(3, "ToolCall", "t1")])
    assert [r.entity_types for r in plan.rounds] == [("Session", "ToolCall"), ("ToolCall",)]
    assert [len(r.arguments) for r in plan.rounds] == [2 * ARGUMENTS_PER_TABLE, ARGUMENTS_PER_TABLE]
    assert set(ENTITY_TYPES) >= {t for r in plan.rounds for t in r.entity_types}
    every = plan.rounds[1].for_every_table()
    assert len(every) == ARGUMENTS_PER_TABLE * len(ENTITY_TYPES)
    tool_calls = ENTITY_TYPES.index("ToolCall") * ARGUMENTS_PER_TABLE
    assert every[tool_calls : tool_calls + ARGUMENTS_PER_TABLE] == plan.rounds[1].arguments
    assert every[:ARGUMENTS_PER_TABLE] == ["[]", b"", [], [], b""]  # no Session in it


def test_a_batch_opens_with_its_settings_before_its_locks() -> None:
    opening = batch_opening(30.0, [-7, 12])
    begin, settings, locks = [part.strip() for part in opening.split(";") if part.strip()]
    assert begin == "BEGIN"
    assert "set_config('statement_timeout', '30000', true)" in settings
    assert "set_config('lock_timeout', '15000', true)" in settings
    assert f"pg_advisory_xact_lock({LOCK_NAMESPACE}, k)" in locks
    assert "'{-7,12}'::int[]" in locks


def test_redactor_scrubs_nested_values() -> None:
    redact = Redactor(["hunter2"])
    event = {"event": "x hunter2", "nested": {"a": ["hunter2!", 1]}, "n": 3}
    assert redact(None, "info", event) == {
        "event": "x ********",
        "nested": {"a": ["********!", 1]},
        "n": 3,
    }
    assert Redactor([])(None, "info", event) is event


def test_logs_are_json_lines_without_secrets() -> None:
    stream = io.StringIO()
    configure_logging(level="info", json_lines=True, secrets=["hunter2"], stream=stream)
    log = get_logger(workspace="/w")
    log.debug("hidden")
    log.info("connected", dsn="postgresql://u:hunter2@h/d")
    try:
        raise ValueError("boom hunter2")
    except ValueError:
        log.exception("failed")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["connected", "failed"]
    assert lines[0]["workspace"] == "/w"
    assert "hunter2" not in stream.getvalue()
    assert "ValueError: boom ********" in lines[1]["exception"]


def test_console_logs_on_a_terminal_style_stream() -> None:
    stream = io.StringIO()
    configure_logging(level="debug", json_lines=False, stream=stream)
    get_logger().debug("shown", key="value")
    assert "shown" in stream.getvalue()
    assert "key=value" in stream.getvalue()


@pytest.fixture(autouse=True)
def _reset_logging() -> None:
    configure_logging(level="warning", json_lines=True, stream=io.StringIO())


@pytest.mark.parametrize(
    ("payload", "session", "seen"),
    [
        (b'{"task_id":"t","session_id":"sess_a","title":"x"}', "sess_a", True),
        (b'{"task_id" : "t", "session_id"\n :\t "sess_a"}', "sess_a", True),
        (b'{"step_id":"s","task_id":"t"}', "sess_a", True),  # names none: the record's
        (b'{"meta":{"session_id":"sess_a"}}', "sess_a", True),  # nested only: the record's
        (b'{"title":"a\\"session_id","session_id":"sess_a"}', "sess_a", False),  # twice
        (b'{"session_id":"sess_b"}', "sess_a", False),  # another session: parsed
        (b'{"session_id":"sess_ab"}', "sess_a", False),
        (b'{"session_id":null}', "sess_a", False),
        (b'{"session\\u005fid":"sess_b"}', "sess_a", False),  # spelled with an escape
        (b'{"session_id":"sess_a","session_id":"sess_b"}', "sess_a", False),
        (b'{"session_id":"sess_a"}', None, False),
        (b'{"session_id":"x\\\\"}', "x\\", False),
    ],
)
def test_the_sender_tells_a_payloads_session_only_when_it_is_the_records(
    payload: bytes, session: str | None, seen: bool
) -> None:
    """When it says so, the payload's session (its top-level session_id, the last one
    given, else the record's: as jsonb reads it) is the record's; else the round parses."""
    assert session_is_the_records(payload, session) is seen
    named = json.loads(payload).get("session_id")
    if seen:
        assert (named if isinstance(named, str) else session) == session


@pytest.mark.parametrize(
    ("schema", "table", "constraint", "raced"),
    [
        ("acode", "sessions", "sessions_pkey", True),
        ("acode", "tool_calls", "tool_calls_tool_call_id_key", True),
        # A Citus shard's names: the table's and the constraint's with the shard id.
        ("acode", "sessions_102008", "sessions_pkey_102008", True),
        ("acode", "tool_calls_102044", "tool_calls_tool_call_id_key_102044", True),
        ("acode", "sessions_102008", "sessions_pkey_102009", False),
        ("acode", "conflicts", "conflicts_pkey", False),
        ("acode", "applied_keys_p20261201", "applied_keys_p20261201_pkey", False),
        ("other", "sessions", "sessions_pkey", False),
    ],
)
def test_a_race_is_a_unique_violation_of_an_entity_key_on_a_server_or_a_shard(
    schema: str, table: str, constraint: str, raced: bool
) -> None:
    error = asyncpg.UniqueViolationError("duplicate key value violates unique constraint")
    error.schema_name, error.table_name, error.constraint_name = schema, table, constraint
    assert is_entity_race(error) is raced


def test_the_round_records_only_the_keys_of_the_versions_it_replaces() -> None:
    # A new entity's key and digest are its row's: only an update over a held version
    # writes applied_keys, one insert per table, of the version it replaced.
    every = round_sql(ENTITY_TYPES, history=False)
    assert every.count("INSERT INTO acode.applied_keys") == len(ENTITY_TYPES)
    one = round_sql(("Session",), history=False)
    assert one.count("INSERT INTO acode.applied_keys") == 1
    assert "SELECT d.session_id, d.current_key, d.current_updated_at, d.current_digest" in one
    assert "WHERE d.wins AND d.has_current AND d.current_digest IS NOT NULL" in one
