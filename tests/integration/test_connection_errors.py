"""Connection failures that say what is wrong and how to fix it: TLS files, a server
without TLS, a missing or a rejected password. Real servers, no mocks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from acode_sync.config import PostgresSettings
from acode_sync.errors import PostgresUnavailableError
from acode_sync.postgres import PostgresTarget
from acode_sync.secret import Secret
from tests.cluster import CLUSTER_PASSWORD, PasswordCluster, password_cluster

pytestmark = [pytest.mark.postgres, pytest.mark.anyio]


async def _failure(settings: PostgresSettings) -> PostgresUnavailableError:
    target = PostgresTarget(settings)
    try:
        with pytest.raises(PostgresUnavailableError) as raised:
            await target.ensure_schema()
    finally:
        await target.close()
    return raised.value


async def test_sslmode_require_against_a_server_without_tls_says_so(pg_url: str) -> None:
    # The test server runs with ssl = off.
    error = await _failure(PostgresSettings(dsn=pg_url, sslmode="require"))
    assert "the server does not offer TLS, and sslmode=require requires it" in error.message
    assert "ssl = on" in error.message


async def test_a_ca_file_gone_after_loading_is_named_with_the_mode(
    pg_url: str, tmp_path: Path
) -> None:
    ca = tmp_path / "db-ca.pem"
    settings = PostgresSettings(dsn=pg_url, sslmode="verify-full", sslrootcert=ca)
    error = await _failure(settings)  # the loader checked it; then it was removed
    assert f"cannot read {ca} (sslrootcert): no such file" in error.message
    assert "sslmode=verify-full" in error.message
    assert "postgres.sslrootcert" in error.message


async def test_verify_full_without_a_ca_file_names_the_default_one(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("PGSSLROOTCERT", raising=False)
    error = await _failure(PostgresSettings(dsn=pg_url, sslmode="verify-full"))
    assert str(tmp_path / ".postgresql" / "root.crt") in error.message
    assert "(sslmode=verify-full); set postgres.sslrootcert" in error.message


@pytest.fixture(scope="module")
def cluster() -> Iterator[PasswordCluster]:
    with password_cluster() as made:
        yield made


async def test_no_password_and_a_wrong_password_read_differently(
    cluster: PasswordCluster, tmp_path: Path
) -> None:
    missing = await _failure(PostgresSettings(dsn=cluster.url()))
    assert "SQLSTATE 28P01" in missing.message
    assert "the server asks for a password and none is configured" in missing.message

    wrong = "Wrong-Pa55-0001"
    rejected = await _failure(PostgresSettings(dsn=cluster.url(), password=Secret(wrong)))
    assert "the server rejected the password (from postgres.password" in rejected.message
    assert wrong not in rejected.message

    password_file = tmp_path / "password"
    password_file.write_text(wrong + "\n")
    from_file = await _failure(PostgresSettings(dsn=cluster.url(), password_file=password_file))
    assert f"from postgres.password_file {password_file}" in from_file.message
    assert wrong not in from_file.message

    good = PostgresTarget(PostgresSettings(dsn=cluster.url(), password=Secret(CLUSTER_PASSWORD)))
    try:
        assert await good.probe()
    finally:
        await good.close()
