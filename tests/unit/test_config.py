from __future__ import annotations

import errno
import os
from pathlib import Path
from urllib.parse import quote

import pytest

from acode_sync.config import (
    POOLED_GATHER_SECONDS,
    Config,
    PostgresSettings,
    _unreadable_hint,
    apply_environment,
    find_config_file,
    gather_seconds,
    load_config,
    parse_config,
    read_config_file,
    split_password,
)
from acode_sync.errors import ConfigError
from acode_sync.secret import Secret

PASSWORD = "Pa55-w0rd-!@:/?#"


def test_defaults() -> None:
    config = Config()
    assert config.postgres.pool_max == 10
    assert config.postgres.pool_min == 0
    assert config.sync.batch_max_records == 1000
    assert config.sync.max_attempts == 10
    assert config.sync.retention_days == 7
    assert config.daemon.gather_seconds is None


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        ({}, 0.0),  # direct: ship at once
        ({"postgres": {"statement_cache_size": 0}}, POOLED_GATHER_SECONDS),  # behind PgBouncer
        ({"postgres": {"statement_cache_size": 0}, "daemon": {"gather_seconds": 0}}, 0.0),
        ({"daemon": {"gather_seconds": 2}}, 2.0),
    ],
    ids=["direct", "behind a pooler", "off behind a pooler", "set"],
)
def test_gathering_defaults_to_on_behind_a_pooler_only(
    raw: dict[str, dict[str, object]], seconds: float
) -> None:
    assert gather_seconds(parse_config(raw)) == seconds


@pytest.mark.parametrize(
    ("url", "clean"),
    [
        ("postgresql://app:s3cret@db.example:5432/acode", "postgresql://app@db.example:5432/acode"),
        (
            "postgresql://db/acode?password=s3cret&sslmode=require",
            "postgresql://db/acode?sslmode=require",
        ),
        ("postgres://app@db/acode", "postgres://app@db/acode"),
    ],
)
def test_password_is_split_from_the_url(url: str, clean: str) -> None:
    dsn, password = split_password(url)
    assert dsn == clean
    assert "s3cret" not in dsn
    assert (password is None) == ("s3cret" not in url)
    if password is not None:
        assert password.reveal() == "s3cret"


def test_an_encoded_password_is_decoded() -> None:
    _, password = split_password("postgresql://app:a%40b%3Ac@db/acode")
    assert password is not None
    assert password.reveal() == "a@b:c"


def test_non_url_dsn_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"postgres\.dsn"):
        split_password("host=db password=x")


def test_secret_never_shows_itself() -> None:
    secret = Secret(PASSWORD)
    settings = PostgresSettings(password=secret)
    for text in (
        repr(secret),
        str(secret),
        f"{secret}",
        repr(settings),
        str(Config(postgres=settings)),
    ):
        assert PASSWORD not in text
    assert secret == Secret(PASSWORD)
    assert hash(secret) == hash(Secret(PASSWORD))
    with pytest.raises(TypeError):
        secret.__reduce__()


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    config = parse_config({"postgres": {"dsn": "postgresql://file-host/acode", "password": "file"}})
    env = {"ACODE_POSTGRES_URL": f"postgresql://app:{quote(PASSWORD, safe='')}@env-host/acode"}
    merged = apply_environment(config, env)
    assert merged.postgres.dsn == "postgresql://app@env-host/acode"
    assert merged.postgres.resolved_password() == PASSWORD
    only_password = apply_environment(config, {"ACODE_POSTGRES_PASSWORD": "p2"})
    assert only_password.postgres.resolved_password() == "p2"
    password_file = tmp_path / "pw"
    password_file.write_text("from-file\n")
    from_file = apply_environment(config, {"ACODE_POSTGRES_PASSWORD_FILE": str(password_file)})
    assert from_file.postgres.resolved_password() == "from-file"
    missing = apply_environment(config, {"ACODE_POSTGRES_PASSWORD_FILE": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match="password_file"):
        missing.postgres.resolved_password()


def test_connect_dsn_adds_tls_settings_without_password(tmp_path: Path) -> None:
    root_cert = tmp_path / "root.pem"
    root_cert.write_text("a CA certificate\n")
    settings = parse_config(
        {
            "postgres": {
                "dsn": "postgresql://u:pw@db.example/acode",
                "sslmode": "verify-full",
                "sslrootcert": str(root_cert),
            }
        }
    ).postgres
    dsn = settings.connect_dsn()
    assert "pw" not in dsn
    assert "sslmode=verify-full" in dsn
    assert f"sslrootcert={quote(str(root_cert), safe='')}" in dsn
    assert settings.host_description() == "db.example/acode"
    assert settings.is_remote_without_tls() is False


@pytest.mark.parametrize(
    ("dsn", "sslmode", "warn"),
    [
        ("postgresql://db.example/acode", None, True),
        ("postgresql://db.example/acode", "prefer", True),
        ("postgresql://db.example/acode", "require", False),
        ("postgresql://127.0.0.1:5432/acode", None, False),
        ("postgresql://localhost/acode", "disable", False),
        ("postgresql://[::1]:5432/acode", None, False),
        ("postgresql://db.example/acode?sslmode=verify-full", None, False),
    ],
)
def test_remote_hosts_without_tls_are_flagged(dsn: str, sslmode: str | None, warn: bool) -> None:
    assert PostgresSettings(dsn=dsn, sslmode=sslmode).is_remote_without_tls() is warn


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"postgres": {"pool_max": 0}}, "postgres.pool_max"),
        ({"postgres": {"pool_min": 5, "pool_max": 2}}, "postgres.pool_min"),
        ({"postgres": {"pool_max": "ten"}}, "postgres.pool_max"),
        ({"postgres": {"pool_max": True}}, "postgres.pool_max"),
        ({"postgres": {"sslmode": "sometimes"}}, "postgres.sslmode"),
        ({"postgres": {"colour": "blue"}}, "postgres.colour"),
        ({"postgres": {"connect_timeout": -1}}, "postgres.connect_timeout"),
        ({"postgres": {"auto_migrate": "yes"}}, "postgres.auto_migrate"),
        ({"postgres": "x"}, "[postgres]"),
        ({"sync": {"batch_max_records": 0}}, "sync.batch_max_records"),
        ({"sync": {"batch_max_records": 1.5}}, "sync.batch_max_records"),
        ({"sync": {"nope": 1}}, "sync.nope"),
        ({"daemon": {"gather_seconds": -0.1}}, "daemon.gather_seconds"),
    ],
)
def test_invalid_values_name_their_key(raw: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert key in info.value.message
    assert info.value.code == "ACODE-DB-007"
    assert info.value.exit_code == 78


def test_file_values_are_typed(tmp_path: Path) -> None:
    path = tmp_path / "acode-syncd.toml"
    path.write_text(
        '[postgres]\ndsn = "postgresql://db/acode"\npool_max = 4\nconnect_timeout = 3\n'
        'auto_migrate = false\npassword_file = "~/pw"\n[sync]\nretry_base_seconds = 1\n'
    )
    config = read_config_file(path)
    assert config.postgres.pool_max == 4
    assert config.postgres.connect_timeout == 3.0
    assert config.postgres.auto_migrate is False
    assert config.postgres.password_file == Path("~/pw").expanduser()
    assert config.sync.retry_base_seconds == 1.0
    assert config.source == path


def test_unreadable_or_invalid_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        read_config_file(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[postgres\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_config_file(bad)


def test_config_file_is_found_in_order(tmp_path: Path) -> None:
    explicit = tmp_path / "explicit.toml"
    assert find_config_file(explicit, {"ACODE_SYNC_CONFIG": "/x.toml"}) == explicit
    assert find_config_file(None, {"ACODE_SYNC_CONFIG": "/x.toml"}) == Path("/x.toml")
    xdg = tmp_path / "xdg"
    (xdg / "acode-sync").mkdir(parents=True)
    user_file = xdg / "acode-sync" / "acode-syncd.toml"
    user_file.write_text("")
    assert find_config_file(None, {"XDG_CONFIG_HOME": str(xdg)}) == user_file
    assert find_config_file(None, {"XDG_CONFIG_HOME": str(tmp_path / "none")}) in (
        None,
        Path("/etc/acode-sync/acode-syncd.toml"),
    )


def test_load_config_without_a_file_uses_defaults_and_environment(tmp_path: Path) -> None:
    config = load_config(
        None, {"XDG_CONFIG_HOME": str(tmp_path), "ACODE_POSTGRES_URL": "postgresql://h/d"}
    )
    assert config.postgres.dsn == "postgresql://h/d"


@pytest.mark.parametrize(
    ("raw", "hint"),
    [
        ({"postgres": {"sslmod": "require"}}, "Did you mean postgres.sslmode?"),
        ({"daemon": {"root": ["/srv"]}}, "Did you mean daemon.roots?"),
        ({"metrics": {"prot": 9464}}, "Did you mean metrics.port?"),
        (
            {"sync": {"pool_max": 4}},
            "pool_max is a setting of [postgres]: move it below that header.",
        ),
        (
            {"sync": {"pool_mx": 4}},
            "Did you mean postgres.pool_max? (it belongs in [postgres])",
        ),
        (
            {"metrics": {"colour": "blue"}},
            "The settings of [metrics] are: enabled, address, port, ready_max_lag_seconds.",
        ),
        ({"postgress": {"dsn": "postgresql://h/d"}}, "Did you mean [postgres]?"),
        (
            {"dsn": "postgresql://h/d"},
            "dsn is a setting of [postgres]: move it below that header.",
        ),
        ({"colour": {}}, "The sections are [postgres], [sync], [daemon], [metrics]."),
    ],
)
def test_an_unknown_name_gets_the_likely_one(raw: dict[str, object], hint: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert info.value.hint == hint


def test_file_errors_get_hints_of_their_own(tmp_path: Path) -> None:
    hints = []
    bad = tmp_path / "bad.toml"
    bad.write_text('[postgres]\ndsn = postgresql://h/d"\n')
    for path in (tmp_path / "missing.toml", bad, tmp_path):
        with pytest.raises(ConfigError) as info:
            read_config_file(path)
        hints.append(info.value.hint)
    # Root reads any file, so the hint for a file the user may not read is asked directly.
    hints.append(_unreadable_hint(PermissionError(errno.EACCES, "Permission denied")))
    missing, syntax, directory, denied = hints
    assert missing.startswith("Check the path given with --config or $ACODE_SYNC_CONFIG")
    assert syntax.startswith("Fix the syntax at the line and column named above")
    assert directory.startswith("Name a TOML file")
    assert denied.startswith("Give the daemon's user read access")
    assert len(set(hints)) == len(hints)
    assert ConfigError.default_hint not in hints
    assert not [hint for hint in hints if "check-config" in hint or "key named" in hint]


def test_an_unreadable_password_file_says_what_to_put_there(tmp_path: Path) -> None:
    settings = PostgresSettings(password_file=tmp_path / "absent")
    with pytest.raises(ConfigError) as info:
        settings.resolved_password()
    assert info.value.hint.startswith("Put the password alone in that file")


def test_a_config_path_that_cannot_be_looked_at_is_a_config_error(tmp_path: Path) -> None:
    """A user's config path that stat() refuses (a directory on the way the user may not
    search; a name too long, which refuses root too) is reported with the path, not as a
    traceback."""
    too_long = tmp_path / ("x" * 300)
    with pytest.raises(ConfigError, match=r"cannot read .*/acode-syncd\.toml: File name too long"):
        find_config_file(None, {"XDG_CONFIG_HOME": str(too_long)})
    closed = tmp_path / "closed"
    (closed / "acode-sync").mkdir(parents=True)
    closed.chmod(0)
    try:
        if not os.access(closed, os.X_OK):  # not root
            with pytest.raises(ConfigError, match="Permission denied") as info:
                find_config_file(None, {"XDG_CONFIG_HOME": str(closed)})
            assert info.value.hint.startswith("Give the daemon's user read access")
    finally:
        closed.chmod(0o700)
