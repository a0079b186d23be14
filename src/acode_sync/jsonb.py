"""PostgreSQL's jsonb text form, reproduced in Python (`payload::jsonb::text`).

Keys ordered by their UTF-8 length, then by their bytes (a repeated key keeps its last
value); ", " and ": " between items; strings escaped as json.dumps escapes them with
ensure_ascii off; numbers spelled as PostgreSQL spells them. Its SHA-256, in UTF-8, is an
entity row's `canonical_digest` (docs/postgres.md): what a restore proves a row by.

jsonb_text spells a value read back from PostgreSQL (numbers kept verbatim from its
text). payload_digest_as_jsonb computes the digest of a payload about to be shipped, so
that PostgreSQL need not spell the jsonb text of every row it writes; for a payload it
cannot spell with certainty it answers None, and PostgreSQL computes the digest itself.
"""

from __future__ import annotations

import hashlib
import json
import json.encoder
from collections.abc import Callable
from typing import Any, NoReturn


class _Number(str):
    """A JSON number, as its text."""


def _key_order(key: str) -> tuple[int, bytes]:
    encoded = key.encode()
    return len(encoded), encoded


quoted: Callable[[str], str] = json.encoder.encode_basestring  # json.dumps, ensure_ascii off
loads: Callable[[str], Any] = json.JSONDecoder(parse_int=_Number, parse_float=_Number).decode


def sorted_keys(keys: Any) -> list[str]:
    """Keys in jsonb order."""
    ordered = sorted(keys)
    if "".join(ordered).isascii():  # the common case: one byte a character
        ordered.sort(key=len)  # stable: by length, then (sorted above) by bytes
    else:
        ordered.sort(key=_key_order)
    return ordered


def jsonb_text(value: Any) -> str:
    """The jsonb text of a value as `loads` reads PostgreSQL's text of it."""
    kind = type(value)
    if kind is str:
        return quoted(value)
    if kind is _Number:
        return str.__str__(value)
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, list):
        return "[" + ", ".join(jsonb_text(item) for item in value) + "]"
    if isinstance(value, dict):
        items = (f"{quoted(key)}: {jsonb_text(value[key])}" for key in sorted_keys(value))
        return "{" + ", ".join(items) + "}"
    raise TypeError(f"not a JSON value: {type(value).__name__}")


class _NotCertain(Exception):
    """A payload whose jsonb text this module does not spell with certainty."""


def _not_certain(_text: str) -> NoReturn:
    raise _NotCertain


# An integer's text is PostgreSQL's (JSON has no leading zeros, and -0 is 0 in both);
# a fraction or an exponent PostgreSQL respells as a numeric (1E2 is 100, 1.0e1 is 10.0):
# left to it, as NaN and Infinity, which it refuses.
_strict_loads: Callable[[str], Any] = json.JSONDecoder(
    parse_float=_not_certain, parse_constant=_not_certain
).decode
_jsonb_dumps: Callable[[Any], str] = json.JSONEncoder(
    ensure_ascii=False, check_circular=False, separators=(", ", ": ")
).encode


def _in_jsonb_order(value: Any) -> Any:
    kind = type(value)
    if kind is dict:
        return {key: _in_jsonb_order(value[key]) for key in sorted_keys(value)}
    if kind is list:
        return [_in_jsonb_order(item) for item in value]
    return value


def payload_digest_as_jsonb(payload: bytes) -> bytes | None:
    """SHA-256 of the payload's jsonb text in UTF-8, or None where PostgreSQL must spell it:
    a payload that is not UTF-8 JSON (PostgreSQL refuses it with its own reason), holds a
    fraction or an exponent, an integer longer than Python reads, a lone surrogate, or is
    nested deeper than Python recurses."""
    try:
        text = _jsonb_dumps(_in_jsonb_order(_strict_loads(payload.decode())))
        return hashlib.sha256(text.encode()).digest()
    except (_NotCertain, ValueError, RecursionError):  # UnicodeError is a ValueError
        return None
