"""Outbox payloads as a writer of the plain-INSERT contract (docs/schema.md) builds them."""

from __future__ import annotations

from typing import Any


def session_payload(session_id: str, stamp: str, **fields: Any) -> dict[str, Any]:
    """A Session's full row, created and updated at `stamp`; `fields` override columns."""
    return {
        "session_id": session_id,
        "state": "CREATED",
        "title": None,
        "metadata": None,
        "created_at": stamp,
        "updated_at": stamp,
        **fields,
    }
