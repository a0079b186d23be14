"""Shared fixtures. Async tests run on anyio's own pytest plugin, asyncio backend only:
asyncpg is asyncio-only."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import structlog

from acode_sync.store import WorkspaceStore
from acode_sync.workspace import OpenOptions

pytest_plugins = ["tests.pg", "tests.reliability.plugin"]


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    """A command run in-process configures logging onto its (captured) stream: undo it."""
    yield
    structlog.reset_defaults()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    path = tmp_path / "workspace"
    path.mkdir()
    return path


@pytest.fixture
async def store(workspace: Path) -> AsyncIterator[WorkspaceStore]:
    async with await WorkspaceStore.open(workspace, OpenOptions(busy_timeout=5.0)) as opened:
        yield opened
