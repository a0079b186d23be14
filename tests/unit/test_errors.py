from __future__ import annotations

import pytest

from acode_sync.errors import (
    ALL_ERRORS,
    EX_CONFIG,
    AcodeError,
    ConfigError,
    InvalidTransitionError,
    RecordRejectedError,
)


def test_codes_are_distinct_and_numbered_001_to_007() -> None:
    assert [e.code for e in ALL_ERRORS] == [f"ACODE-DB-00{n}" for n in range(1, 8)]


@pytest.mark.parametrize("cls", ALL_ERRORS)
def test_default_message_and_hint(cls: type[AcodeError]) -> None:
    error = cls()
    assert error.message == (cls.__doc__ or "").strip()
    assert error.hint == cls.default_hint
    assert str(error) == f"{cls.code}: {error.message}"


def test_message_and_hint_can_be_given() -> None:
    error = RecordRejectedError("bad", hint="do this")
    assert (str(error), error.hint) == ("ACODE-DB-006: bad", "do this")


def test_transition_errors_are_rejections_and_config_errors_exit_78() -> None:
    assert issubclass(InvalidTransitionError, RecordRejectedError)
    assert ConfigError.exit_code == EX_CONFIG == 78
