"""The DSN: taken apart and checked at load, never printed raw, its password kept apart."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote, unquote

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from acode_sync import config as config_module
from acode_sync.config import (
    Config,
    PostgresSettings,
    apply_environment,
    parse_config,
    parse_dsn,
    split_password,
)
from acode_sync.daemon_cli import effective_config
from acode_sync.errors import ConfigError

# Every printable character, the URL delimiters first, and the rest of Unicode.
PASSWORDS = st.text(
    st.one_of(st.sampled_from("/#?@:[]%&=+ "), st.characters(blacklist_categories=("Cs", "Cc"))),
    min_size=1,
    max_size=24,
)
USERS = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=12)
HOST = "127.0.0.1:5432/acode"
# Every message and hint the checks can print is a literal in config.py: a password that
# is a piece of one cannot be told from it.
VOCABULARY = Path(config_module.__file__).read_text() + str(ConfigError())


def load(url: str) -> Config:
    return apply_environment(Config(), {"ACODE_POSTGRES_URL": url})


def refused(url: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(url)
    assert info.value.code == "ACODE-DB-007"
    assert info.value.exit_code == 78
    return info.value


def outputs(config: Config) -> list[str]:
    """Everything that shows the settings: descriptions, the URL asyncpg gets, check-config."""
    postgres = config.postgres
    return [
        postgres.host_description(),
        postgres.connect_dsn(),
        postgres.dsn,
        repr(config),
        json.dumps(effective_config(config), ensure_ascii=False),
    ]


def forms(password: str) -> set[str]:
    """The ways a password could be printed: as given, decoded, encoded."""
    return {password, unquote(password), quote(password, safe=""), quote(password)}


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("postgresql://syncer:pa/ss#w?rd@db.example:5432/acode", "look like an unencoded password"),
        ("postgresql://syncer:pa#ss@db.example/acode", "look like an unencoded password"),
        ("postgresql://syncer:pa?ss@db.example/acode", "look like an unencoded password"),
        ("postgresql://syncer:pa@ss@db.example/acode", "more than one `@`"),
        ("postgresql://u@[127.0.0.1/x", "not an IPv6 address"),
        ("postgresql://u@[::1/x", "not an IPv6 address"),
        ("postgresql://u@[::1]x/acode", "not an IPv6 address"),
        ("postgresql://u@db.example:port/acode", "port is not a number"),
        ("postgresql://u@db.example:/acode", "port is not a number"),
        ("postgresql://u@db.example:0/acode", "between 1 and 65535"),
        ("postgresql://u@db.example:65536/acode", "between 1 and 65535"),
        ("postgresql://u@h1:5432,h2:x/acode", "port is not a number"),
        ("postgresql://u@db example/acode", "not a host name"),
        ("postgresql://u:secret@db.example", "names no database"),
        ("postgresql://u@db.example/", "names no database"),
        ("postgresql://u@db.example/a/b", "database name has a `/`"),
        ("postgresql://u@db.example/acode#frag", "has a `#`"),
        ("postgresql://u:s%zzecret@db.example/acode", "no percent-escape"),
        ("postgresql://u:s%FFecret@db.example/acode", "not UTF-8"),
        ("postgresql://u:se\ncret@db.example/acode", "control character"),
        ("postgresql://u:se\udcffcret@db.example/acode", "not valid UTF-8"),
        ("mysql://u:secret@db.example/acode", "postgresql:// URL"),
        ("host=db.example password=secret", "postgresql:// URL"),
        ("postgresql://u@db.example/acode?sslmode=sometimes", "sslmode must be one of"),
        ("postgresql://u@db.example/acode?sslmod=require", "query parameter 1 is not one of"),
        ("postgresql://u@db.example/acode?host=elsewhere", "query parameter 1 is not one of"),
        ("postgresql://u@db.example/acode?sslmode", "query parameter 1 has no `=`"),
        ("postgresql://u@db.example/acode?sslmode=require&sslmode=disable", "sslmode twice"),
        ("postgresql://u@db.example/acode?password=a&password=b", "password twice"),
        ("postgresql://u:a@db.example/acode?password=b", "password twice"),
    ],
)
def test_an_invalid_dsn_is_described_never_quoted(url: str, problem: str) -> None:
    error = refused(url)
    assert error.message.startswith("ACODE_POSTGRES_URL: ")
    assert problem in error.message
    for part in ("syncer", "secret", "pa/ss", "127.0.0.1/x", "elsewhere", "sometimes", "frag"):
        assert part not in str(error) + error.hint


def test_an_unencoded_password_gets_the_encoding_hint() -> None:
    error = refused("postgresql://syncer:pa/ss#w?rd@db.example:5432/acode")
    for advice in ("%2F", "%23", "%3F", "%40", "ACODE_POSTGRES_PASSWORD"):
        assert advice in error.hint


def test_a_dsn_in_the_file_is_checked_the_same_way() -> None:
    with pytest.raises(ConfigError, match=r"^ACODE-DB-007: postgres\.dsn: the DSN has a bracket"):
        parse_config({"postgres": {"dsn": "postgresql://u@[127.0.0.1/x"}})


@pytest.mark.parametrize(
    ("url", "description", "remote_without_tls"),
    [
        ("postgresql://u@db.example:5432/acode", "db.example:5432/acode", True),
        ("postgres://u@h1:5432,h2:5433/acode", "h1:5432,h2:5433/acode", True),
        ("postgresql://u@[::1]:5432,127.0.0.1/acode", "[::1]:5432,127.0.0.1/acode", False),
        ("postgresql://[2001:db8::7]/acode?sslmode=verify-full", "[2001:db8::7]/acode", False),
        ("postgresql://%2Frun%2Fpostgresql/acode", "/run/postgresql/acode", False),
        ("postgresql:///acode", "localhost/acode", False),
        ("postgresql://db-1.example/my%20db", "db-1.example/my db", True),
        (
            "POSTGRESQL://bücher.example/acode?target_session_attrs=any",
            "bücher.example/acode",
            True,
        ),
    ],
)
def test_valid_dsns_are_described_from_their_parts(
    url: str, description: str, remote_without_tls: bool
) -> None:
    postgres = load(url).postgres
    assert postgres.host_description() == description
    assert postgres.is_remote_without_tls() is remote_without_tls
    assert parse_dsn(postgres.connect_dsn())[0] == parse_dsn(url)[0]  # rebuilt losslessly


def test_an_encoded_password_is_moved_out_of_the_dsn() -> None:
    password = "pa/ss#w?rd@:[]%&= é"
    for url in (
        f"postgresql://syncer:{quote(password, safe='')}@db.example:5432/acode",
        f"postgresql://syncer@db.example:5432/acode?password={quote(password, safe='')}",
    ):
        postgres = load(url).postgres
        assert postgres.resolved_password() == password
        assert postgres.dsn == "postgresql://syncer@db.example:5432/acode"
        assert postgres.connect_dsn() == postgres.dsn
    dsn, secret = split_password("postgresql://:@db.example/acode")
    assert (dsn, secret and secret.reveal()) == ("postgresql://db.example/acode", "")


def test_ssl_files_must_be_readable_and_are_named(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-ca.pem"
    with pytest.raises(ConfigError) as info:
        load(f"postgresql://db.example/acode?sslrootcert={quote(str(missing))}")
    assert info.value.message == (
        f"ACODE_POSTGRES_URL: the DSN's sslrootcert: {missing} is not a readable file"
    )
    with pytest.raises(ConfigError, match=r"^ACODE-DB-007: postgres\.sslrootcert: .*no-such-ca"):
        parse_config({"postgres": {"sslrootcert": str(missing)}})
    with pytest.raises(ConfigError, match=r"sslkey: .* is not a readable file"):
        load(f"postgresql://db.example/acode?sslkey={quote(str(tmp_path))}")  # a directory

    ca = tmp_path / "ca.pem"
    ca.write_text("a CA certificate\n")
    postgres = load(f"postgresql://db.example/acode?sslmode=verify-ca&sslrootcert={ca}").postgres
    assert postgres.effective_sslmode() == "verify-ca"
    assert parse_config({"postgres": {"sslrootcert": str(ca)}}).postgres.sslrootcert == ca


def test_a_tilde_of_no_user_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"postgres\.password_file: cannot expand the ~"):
        parse_config({"postgres": {"password_file": "~no-such-user-here/pw"}})
    with pytest.raises(ConfigError, match="ACODE_POSTGRES_PASSWORD_FILE: cannot expand"):
        apply_environment(Config(), {"ACODE_POSTGRES_PASSWORD_FILE": "~no-such-user-here/pw"})


def test_settings_built_in_code_are_described_the_same_way() -> None:
    postgres = PostgresSettings(dsn="postgresql://u@db.example/acode", sslmode="require")
    assert postgres.connect_dsn() == "postgresql://u@db.example/acode?sslmode=require"
    assert postgres.is_remote_without_tls() is False


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(password=PASSWORDS, user=USERS)
@example(password="pa/ss#w?rd", user="syncer")
@example(password="a@b", user="syncer")
@example(password="%41%42", user="u")
def test_whatever_the_password_it_is_never_shown(password: str, user: str) -> None:
    user_part = quote(user, safe="")
    baseline = "\n".join(outputs(load(f"postgresql://{user_part}@{HOST}")))
    assume(not any(form in baseline + user + VOCABULARY for form in forms(password)))

    encoded = load(f"postgresql://{user_part}:{quote(password, safe='')}@{HOST}")
    assert encoded.postgres.resolved_password() == password
    assert encoded.postgres.host_description() == HOST
    for text in outputs(encoded):
        assert not any(form in text for form in forms(password))

    refusal: ConfigError | None = None
    try:
        as_typed = load(f"postgresql://{user_part}:{password}@{HOST}")
    except ConfigError as error:
        refusal = error
    if refusal is not None:
        assert refusal.code == "ACODE-DB-007"
        assert not any(form in str(refusal) + refusal.hint for form in forms(password))
        return
    # Accepted as typed only when nothing in it is ambiguous: the URL's own decoding.
    assert as_typed.postgres.resolved_password() == unquote(password)
    assert as_typed.postgres.host_description() == HOST
    for text in outputs(as_typed):
        assert not any(form in text for form in forms(password))


def test_the_documented_encoding_one_liner_encodes_what_the_dsn_needs() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    line = re.search(r"^python3 -c .*'pa/ss'$", doc, re.M)
    assert line is not None
    argv = shlex.split(line.group(0))
    password = "pa/ss#w?rd@:%é"
    done = subprocess.run(
        [sys.executable, *argv[1:-1], password], capture_output=True, text=True, check=True
    )
    encoded = done.stdout.strip()
    assert encoded.startswith("pa%2Fss%23w%3Frd%40")
    assert load(f"postgresql://u:{encoded}@db.example/acode").postgres.resolved_password() == (
        password
    )
