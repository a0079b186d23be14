"""The jsonb text form in Python (acode_sync/jsonb.py) against PostgreSQL's own."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from typing import Any

import anyio
import asyncpg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from acode_sync.config import PostgresSettings
from acode_sync.jsonb import jsonb_text, loads, payload_digest_as_jsonb
from acode_sync.postgres import PostgresTarget, plan_batch
from tests.records import prepared_session

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

_DIGESTS = """
SELECT sha256(convert_to(t::jsonb::text, 'UTF8')) FROM unnest($1::text[]) WITH ORDINALITY AS u(t, n)
ORDER BY n
"""


async def _postgres_digests(dsn: str, texts: Sequence[str]) -> list[bytes]:
    conn = await asyncpg.connect(dsn)
    try:
        return [row[0] for row in await conn.fetch(_DIGESTS, list(texts))]
    finally:
        await conn.close()


@pytest.mark.parametrize(
    "text",
    [
        '{"b": 1, "a": [1.0, 1E2, -0, 0.10, 12345678901234567890.5], "é": "x\\u00e9\\n\\t/\\"q"}',
        '{"aa": {}, "b": [], "ccc": null, "d": true, "e": false, "\\u0001": "\\u001f\\u2028"}',
        "[]",
        '"text"',
    ],
)
async def test_jsonb_text_is_postgresqls_own_spelling(pg_url: str, text: str) -> None:
    conn = await asyncpg.connect(pg_url)
    try:
        spelled, digest = await conn.fetchrow(
            "SELECT $1::jsonb::text, sha256(convert_to($1::jsonb::text, 'UTF8'))", text
        )
    finally:
        await conn.close()
    assert jsonb_text(loads(spelled)) == spelled
    assert hashlib.sha256(jsonb_text(loads(spelled)).encode()).digest() == digest


def test_jsonb_text_refuses_what_json_cannot_hold() -> None:
    with pytest.raises(TypeError, match="not a JSON value: set"):
        jsonb_text({1, 2})


# Any character PostgreSQL's jsonb takes: not NUL (refused, \u0000), not a lone surrogate.
_text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"))
_keys = st.one_of(_text, st.sampled_from(["a", "b", "aa", "é", "ab", "ba", "session_id"]))
_integers = st.one_of(st.integers(), st.integers(-(10**40), 10**40))
_scalars = st.one_of(st.none(), st.booleans(), _integers, _text)
_documents = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_keys, inner, max_size=6)),
    max_leaves=20,
)


def _spelled(value: Any, rng: random.Random) -> str:
    """The value as some writer might spell it: keys in any order, any spacing, \\u escapes
    or not."""
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        space = rng.choice(["", " ", "\n\t "])
        inner = f",{space}".join(
            f"{json.dumps(k, ensure_ascii=rng.random() < 0.5)}{space}:{space}{_spelled(v, rng)}"
            for k, v in items
        )
        return "{" + space + inner + space + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_spelled(item, rng) for item in value) + "]"
    return json.dumps(value, ensure_ascii=rng.random() < 0.5)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(documents=st.lists(st.dictionaries(_keys, _documents, max_size=8), min_size=1, max_size=8),
       seed=st.integers(0, 2**32))  # fmt: skip
@example(documents=[{"a": {"bb": "x", "b": [0, -1]}, "é": "\x01\u2028", "": None}], seed=1)
def test_the_syncers_digest_is_postgresqls(
    pg_url: str, documents: list[dict[str, Any]], seed: int
) -> None:
    """A payload of strings, integers, booleans and nulls, however spelled: the syncer
    computes the digest itself, and it is PostgreSQL's."""
    rng = random.Random(seed)
    texts = [_spelled(document, rng) for document in documents]
    ours = [payload_digest_as_jsonb(text.encode()) for text in texts]
    assert None not in ours
    assert ours == anyio.run(_postgres_digests, pg_url, texts)


@pytest.mark.parametrize(
    "text",
    [
        '{"a": 1, "b": 2, "a": 3}',  # a repeated key keeps its last value
        '{"n": -0, "m": [0, -12, 123456789012345678901234567890]}',
        '{"bb": 1, "a": {"ccc": 2, "dd": 3}, "é": 4, "z": 5}',  # length first, then bytes
        '{"\\u00e9t\\u00e9": "\\ud83d\\ude00", "q": "\\"\\\\\\/\\b\\f\\n\\r\\t\\u0007\\u007f"}',
        ' \n{"a" : [ ] , "b":{ } }\t',
    ],
)
async def test_a_certain_payload_gets_postgresqls_digest(pg_url: str, text: str) -> None:
    assert payload_digest_as_jsonb(text.encode()) == (await _postgres_digests(pg_url, [text]))[0]


@pytest.mark.parametrize(
    "payload",
    [
        b'{"duration": 0.5}',  # PostgreSQL respells fractions and exponents as numerics
        b'{"n": 1E2}',
        b'{"n": NaN}',  # refused by PostgreSQL
        b'{"n": Infinity}',
        b'{"n": ' + b"9" * 5000 + b"}",  # longer than Python reads an integer
        b'{"s": "\\ud800"}',  # a lone surrogate
        b'{"s": "\xff"}',  # not UTF-8
        b"\xef\xbb\xbf{}",  # a byte order mark
        b'{"a": 1,}',  # not JSON
        b"[" * 100_000 + b"]" * 100_000,  # deeper than Python recurses
    ],
)
def test_an_uncertain_payload_is_left_to_postgresql(payload: bytes) -> None:
    assert payload_digest_as_jsonb(payload) is None


@pytest.mark.parametrize("keep_history", [False, True])
async def test_the_round_records_the_senders_digest_else_its_own(
    pg_url: str, keep_history: bool
) -> None:
    # A digest no payload has: the row can only hold it if the round took the sender's.
    sent = prepared_session(1)._replace(canonical_digest=bytes([7]) * 32)
    left_to_postgresql = prepared_session(2)
    target = PostgresTarget(
        PostgresSettings(dsn=pg_url, pool_min=1, pool_max=1, keep_history=keep_history)
    )
    try:
        applied = await target.apply("origin", plan_batch([sent, left_to_postgresql]))
    finally:
        await target.close()
    assert len(applied.applied) == 2
    conn = await asyncpg.connect(pg_url)
    try:
        rows = {r[0]: r[1] for r in await conn.fetch(
            "SELECT session_id, canonical_digest FROM acode.sessions")}  # fmt: skip
        history = {r[0]: r[1] for r in await conn.fetch(
            "SELECT entity_id, canonical_digest FROM acode.entity_history")}  # fmt: skip
        computed = await conn.fetchval(
            "SELECT sha256(convert_to($1::jsonb::text, 'UTF8'))",
            left_to_postgresql.payload.decode(),
        )
    finally:
        await conn.close()
    assert rows == {"sess_1": bytes([7]) * 32, "sess_2": computed}
    assert computed == payload_digest_as_jsonb(left_to_postgresql.payload)
    assert history == (rows if keep_history else {})
