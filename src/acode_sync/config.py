"""Configuration: frozen settings read from TOML and the environment.

Only the edges (the CLIs, the daemon) call `load_config`; the core takes the settings
objects. Every key has a default; an invalid value raises ConfigError naming its key.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote, unquote, urlencode

from acode_sync.errors import ConfigError
from acode_sync.secret import Secret

ENV_POSTGRES_URL: Final = "ACODE_POSTGRES_URL"
ENV_POSTGRES_PASSWORD: Final = "ACODE_POSTGRES_PASSWORD"  # noqa: S105 - a variable name
ENV_POSTGRES_PASSWORD_FILE: Final = "ACODE_POSTGRES_PASSWORD_FILE"  # noqa: S105
ENV_CONFIG: Final = "ACODE_SYNC_CONFIG"
CONFIG_NAME: Final = "acode-syncd.toml"
SSL_MODES: Final = frozenset({"disable", "allow", "prefer", "require", "verify-ca", "verify-full"})
LOCAL_HOSTS: Final = frozenset({"localhost", "127.0.0.1", "::1"})


ENCODE_HINT: Final = (
    "Percent-encode `/` as %2F, `#` as %23, `?` as %3F, `@` as %40 (and `%` as %25) in the "
    "password, or set postgres.password / ACODE_POSTGRES_PASSWORD(_FILE) instead."
)
DSN_HINT: Final = "Write it as postgresql://user@host:5432/dbname and give the password apart."
# Query parameters a DSN may carry (asyncpg's connection parameters that change neither the
# host, nor the database, nor the user). Anything else is refused: asyncpg would silently
# send an unknown key to the server as a setting, so a typo such as `sslmod=require` would
# quietly drop TLS.
DSN_PARAMETERS: Final = (
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslcrl",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "target_session_attrs",
    "krbsrvname",
    "gsslib",
)
DSN_FILE_PARAMETERS: Final = frozenset({"sslrootcert", "sslcert", "sslkey", "sslcrl"})
_HOST_NAME: Final = re.compile(r"[^\W_][\w.-]*")
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class DsnHost:
    """One host of a DSN, decoded: a name, an IP address or a socket directory."""

    name: str
    port: int | None = None

    def shown(self) -> str:
        """For descriptions: `[::1]:5432`, `db.example`, `/run/postgresql`."""
        name = f"[{self.name}]" if ":" in self.name else self.name
        return name if self.port is None else f"{name}:{self.port}"

    def encoded(self) -> str:
        name = f"[{self.name}]" if ":" in self.name else quote(self.name, safe="")
        return name if self.port is None else f"{name}:{self.port}"

    @property
    def is_local(self) -> bool:
        return self.name in LOCAL_HOSTS or self.name.startswith("/")


@dataclass(frozen=True, kw_only=True, slots=True)
class Dsn:
    """A validated postgresql:// URL, taken apart; never holds the password."""

    scheme: str
    user: str | None
    hosts: tuple[DsnHost, ...]
    database: str
    parameters: tuple[tuple[str, str], ...]

    def url(self, **parameters: str) -> str:
        """The URL rebuilt from its parts (every part percent-encoded), `parameters` added
        or replaced."""
        user = "" if self.user is None else quote(self.user, safe="") + "@"
        hosts = ",".join(h.encoded() for h in self.hosts)
        merged = {**dict(self.parameters), **parameters}
        query = "?" + urlencode(merged, quote_via=quote, safe="") if merged else ""
        return f"{self.scheme}://{user}{hosts}/{quote(self.database, safe='')}{query}"

    def description(self) -> str:
        """Host(s), port(s) and database: no user, no password, no parameters."""
        hosts = ",".join(h.shown() for h in self.hosts) or "localhost"
        return f"{hosts}/{self.database}"

    def parameter(self, name: str) -> str | None:
        return dict(self.parameters).get(name)


def _dsn_error(origin: str, problem: str, hint: str = DSN_HINT) -> ConfigError:
    return ConfigError(f"{origin}: {problem}", hint=hint)


def _decoded(text: str, origin: str, part: str) -> str:
    """Percent-decode one part of the DSN; a `%` that is not an escape is refused."""
    if re.search(r"%(?![0-9A-Fa-f]{2})", text):
        raise _dsn_error(
            origin, f"the DSN's {part} has a `%` that is no percent-escape", ENCODE_HINT
        )
    try:
        return unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise _dsn_error(
            origin, f"the DSN's {part} percent-encodes bytes that are not UTF-8"
        ) from None


def _parse_port(text: str, origin: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise _dsn_error(origin, "the DSN's port is not a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise _dsn_error(origin, "the DSN's port is not between 1 and 65535")
    return port


def _parse_host(text: str, origin: str) -> DsnHost:
    if text.startswith("["):
        address, bracket, rest = text[1:].partition("]")
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            raise _dsn_error(
                origin, "the DSN has a bracketed host that is not an IPv6 address"
            ) from None
        if not bracket or (rest and not rest.startswith(":")):
            raise _dsn_error(origin, "the DSN has a bracketed host that is not an IPv6 address")
        return DsnHost(address, _parse_port(rest[1:], origin) if rest else None)
    name, colon, port = text.partition(":")
    name = _decoded(name, origin, "host")
    if not name.startswith("/") and not _HOST_NAME.fullmatch(name):
        raise _dsn_error(
            origin,
            "the DSN's host is not a host name, an IP address or a socket directory "
            "(an unencoded password can look like this)",
            ENCODE_HINT,
        )
    return DsnHost(name, _parse_port(port, origin) if colon else None)


def _parse_parameters(text: str, origin: str) -> tuple[list[tuple[str, str]], Secret | None]:
    parameters: list[tuple[str, str]] = []
    password = None
    for position, pair in enumerate(text.split("&") if text else [], start=1):
        raw_key, equals, raw_value = pair.partition("=")
        key = _decoded(raw_key, origin, f"query parameter {position}")
        value = _decoded(raw_value, origin, f"query parameter {position}")
        if not equals:
            raise _dsn_error(origin, f"the DSN's query parameter {position} has no `=`")
        if key == "password":
            if password is not None:
                raise _dsn_error(origin, "the DSN gives password twice")
            password = Secret(value)
            continue
        if key not in DSN_PARAMETERS:
            raise _dsn_error(
                origin,
                f"the DSN's query parameter {position} is not one of: {', '.join(DSN_PARAMETERS)}",
                "Remove it; the other connection settings have [postgres] keys of their own.",
            )
        if key in dict(parameters):
            raise _dsn_error(origin, f"the DSN gives {key} twice")
        if key == "sslmode" and value not in SSL_MODES:
            raise _dsn_error(
                origin, f"the DSN's sslmode must be one of {', '.join(sorted(SSL_MODES))}"
            )
        parameters.append((key, value))
    return parameters, password


def parse_dsn(text: str, origin: str = "postgres.dsn") -> tuple[Dsn, Secret | None]:
    """Take a postgresql:// URL apart and check every part; return it and its password.

    `origin` (the key or variable the URL came from) starts every error message; no
    message ever quotes the URL, since a password may hide anywhere in a malformed one.
    """
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() not in ("postgres", "postgresql"):
        raise _dsn_error(origin, "the DSN must be a postgresql:// URL")
    try:
        text.encode()
    except UnicodeEncodeError:
        raise _dsn_error(origin, "the DSN is not valid UTF-8") from None
    if _CONTROL.search(text):
        raise _dsn_error(origin, "the DSN has a control character", ENCODE_HINT)
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    if "@" in tail:
        raise _dsn_error(
            origin,
            "the DSN has characters after the host that look like an unencoded password",
            ENCODE_HINT,
        )
    if authority.count("@") > 1:
        raise _dsn_error(origin, "the DSN has more than one `@` before its host", ENCODE_HINT)
    if "#" in tail:
        raise _dsn_error(origin, "the DSN has a `#`", ENCODE_HINT)
    userinfo, at, hostlist = authority.rpartition("@")
    user = password = None
    if at:
        raw_user, colon, raw_password = userinfo.partition(":")
        user = _decoded(raw_user, origin, "user name") or None
        if colon:
            password = Secret(_decoded(raw_password, origin, "password"))
    hosts = tuple(_parse_host(h, origin) for h in hostlist.split(",")) if hostlist else ()
    path, _, query = tail.partition("?")
    database = _decoded(path[1:], origin, "database name")
    if "/" in path[1:]:
        raise _dsn_error(origin, "the DSN's database name has a `/`", ENCODE_HINT)
    if not database:
        raise _dsn_error(origin, "the DSN names no database")
    parameters, query_password = _parse_parameters(query, origin)
    if password is not None and query_password is not None:
        raise _dsn_error(origin, "the DSN gives password twice")
    dsn = Dsn(
        scheme=scheme.lower(),
        user=user,
        hosts=hosts,
        database=database,
        parameters=tuple(parameters),
    )
    return dsn, password if password is not None else query_password


@dataclass(frozen=True, kw_only=True, slots=True)
class PostgresSettings:
    """[postgres]. The DSN never holds the password: it is passed to asyncpg apart."""

    dsn: str = "postgresql://127.0.0.1:5432/acode"
    password: Secret | None = None
    password_file: Path | None = None
    sslmode: str | None = None
    sslrootcert: Path | None = None
    pool_min: int = 0
    pool_max: int = 10
    connect_timeout: float = 10.0
    statement_timeout: float = 30.0
    idle_timeout: float = 60.0
    statement_cache_size: int = 100  # 0 behind a transaction-pooling PgBouncer
    auto_migrate: bool = True
    # Append every version applied to acode.entity_history (docs/postgres.md#version-history),
    # kept this many days (whole daily partitions past it are dropped).
    keep_history: bool = False
    history_retention_days: int = 90

    def resolved_password(self) -> str | None:
        if self.password is not None:
            return self.password.reveal()
        if self.password_file is not None:
            try:
                return self.password_file.read_text().strip()
            except OSError as error:
                raise ConfigError(
                    f"postgres.password_file: cannot read {self.password_file}: "
                    f"{error.strerror or type(error).__name__}",
                    hint="Put the password alone in that file, readable by the user who runs "
                    "this (mode 0600), or point postgres.password_file or "
                    f"{ENV_POSTGRES_PASSWORD_FILE} at the right file.",
                ) from None
        return None

    def parsed_dsn(self) -> Dsn:
        return parse_dsn(self.dsn)[0]

    def connect_dsn(self) -> str:
        """The DSN with sslmode/sslrootcert added; still without the password."""
        added = {"sslmode": self.sslmode} if self.sslmode else {}
        if self.sslrootcert:
            added["sslrootcert"] = str(self.sslrootcert)
        return self.parsed_dsn().url(**added)

    def host_description(self) -> str:
        """Host(s), port(s) and database, for logs and status: no user, no password."""
        return self.parsed_dsn().description()

    def effective_sslmode(self) -> str | None:
        return self.sslmode or self.parsed_dsn().parameter("sslmode")

    def is_remote_without_tls(self) -> bool:
        remote = any(not host.is_local for host in self.parsed_dsn().hosts)
        return remote and self.effective_sslmode() in (None, "disable", "allow", "prefer")


@dataclass(frozen=True, kw_only=True, slots=True)
class SyncSettings:
    """[sync]: batching, retries and retention."""

    batch_max_records: int = 1000
    batch_max_bytes: int = 8 * 1024 * 1024
    max_payload_bytes: int = 4 * 1024 * 1024
    max_attempts: int = 10
    retry_base_seconds: float = 5.0
    retry_cap_seconds: float = 3600.0
    outage_base_seconds: float = 1.0
    outage_cap_seconds: float = 60.0
    retention_days: float = 7.0
    # Conflicts (both versions, for audit) whose incoming version is older than this are
    # dropped centrally, a month's partition at a time; 0: kept for ever.
    conflict_retention_days: float = 0.0
    busy_timeout: float = 30.0
    # A record whose version is further ahead of the syncer's clock is not shipped (it
    # would win every later change): it fails, and is retried as the clock moves on.
    max_clock_skew_seconds: float = 300.0


@dataclass(frozen=True, kw_only=True, slots=True)
class DaemonSettings:
    """[daemon]: which workspaces to watch and how the daemon paces itself."""

    roots: tuple[Path, ...] = ()  # none: the current directory's workspace only
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    max_depth: int = 3
    rescan_seconds: float = 30.0
    sweep_seconds: float = 300.0
    # After a write wakes an idle workspace, wait this long for the agent's next saves so
    # that they ship as one batch (0: ship at once). Unset: gather_seconds(config).
    gather_seconds: float | None = None
    drain_timeout_seconds: float = 20.0
    batches_per_turn: int = 10
    # Workspaces shipping batches at once (also bounded by postgres.pool_max). More than
    # about twice the cores only adds memory and contention.
    max_concurrent_syncs: int = 4
    broken_retry_seconds: float = 30.0
    # Each workspace's `sync summary` log line covers this long (none for an idle one).
    summary_interval_seconds: float = 60.0
    log_level: str = "info"
    log_format: str = "auto"
    state_dir: Path | None = None
    # Each workspace is compared with PostgreSQL this often (acode db verify); 0: never.
    verify_interval_hours: float = 24.0
    # "HH:MM-HH:MM", local time (may wrap past midnight); empty: at any time of day.
    verify_window: str = ""
    # Queue what PostgreSQL lacks or holds older as outbox records. Off: report only.
    verify_repair: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class MetricsSettings:
    """[metrics]: the Prometheus endpoint."""

    enabled: bool = True
    address: str = "127.0.0.1"
    port: int = 9464
    # /readyz fails while the oldest pending record is older (AcodeSyncLagHigh's threshold).
    ready_max_lag_seconds: float = 600.0


@dataclass(frozen=True, kw_only=True, slots=True)
class Config:
    postgres: PostgresSettings = field(default_factory=PostgresSettings)
    sync: SyncSettings = field(default_factory=SyncSettings)
    daemon: DaemonSettings = field(default_factory=DaemonSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    source: Path | None = None


# Behind a transaction pooler (no statement cache) every statement of a batch is parsed
# and planned again: there an agent's saves are gathered into fewer batches by default.
POOLED_GATHER_SECONDS: Final = 0.5


def gather_seconds(config: Config) -> float:
    """[daemon] gather_seconds as set; unset, POOLED_GATHER_SECONDS behind a transaction
    pooler (postgres.statement_cache_size = 0), else 0: a direct connection's batch is
    cheap, and shipping at once keeps commit-to-visible in milliseconds."""
    if config.daemon.gather_seconds is not None:
        return config.daemon.gather_seconds
    return POOLED_GATHER_SECONDS if config.postgres.statement_cache_size == 0 else 0.0


def split_password(text: str, origin: str = "postgres.dsn") -> tuple[str, Secret | None]:
    """Check a postgresql:// URL; return it rebuilt without its password, and the password
    (from the user info or ?password=)."""
    dsn, password = parse_dsn(text, origin)
    return dsn.url(), password


def _section(raw: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{name}] must be a table")
    return value


def _convert(key: str, kind: str, value: Any) -> Any:
    """One TOML value to the type its settings field declares (annotations are strings)."""
    wrong = ConfigError(f"{key} has the wrong type ({type(value).__name__}); expected {kind}")
    if kind == "bool":
        if not isinstance(value, bool):
            raise wrong
        return value
    if kind in ("int", "float", "float | None"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise wrong
        if kind == "int" and not isinstance(value, int):
            raise wrong
        return value if kind == "int" else float(value)
    if kind.startswith("tuple"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key} must be a list of strings")
        paths = "Path" in kind
        return tuple(_expanded(v, key) if paths else v for v in value)
    if not isinstance(value, str):
        raise wrong
    if kind.startswith("Path"):
        return _expanded(value, key)
    if kind.startswith("Secret"):
        return Secret(value)
    return value


def _parse_section(raw: Mapping[str, Any], name: str, cls: type[Any]) -> Any:
    table = _section(raw, name)
    kinds = {f.name: str(f.type) for f in fields(cls)}
    values = {}
    for key, value in table.items():
        if key not in kinds:
            raise ConfigError(f"{name}.{key} is not a known setting", hint=_key_hint(name, key))
        values[key] = _convert(f"{name}.{key}", kinds[key], value)
        if isinstance(values[key], int | float) and not isinstance(values[key], bool):
            minimum = 0 if key in _MAY_BE_ZERO else 1e-9
            if values[key] < minimum:
                raise ConfigError(f"{name}.{key} must be {'>= 0' if minimum == 0 else 'positive'}")
    return cls(**values)


_MAY_BE_ZERO = frozenset(
    {
        "pool_min",
        "max_depth",
        "port",
        "statement_cache_size",
        "verify_interval_hours",
        "conflict_retention_days",
        "gather_seconds",
    }
)
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
LOG_FORMATS: Final = ("auto", "json", "console")


def _parse_postgres(raw: Mapping[str, Any]) -> PostgresSettings:
    settings: PostgresSettings = _parse_section(raw, "postgres", PostgresSettings)
    dsn, password = split_password(settings.dsn)
    _check_one_password(
        {
            "a password in postgres.dsn": password,
            "postgres.password": settings.password,
            "postgres.password_file": settings.password_file,
        }
    )
    settings = replace(settings, dsn=dsn, password=settings.password or password)
    return _check_postgres(settings, "postgres.dsn")


def _check_one_password(sources: Mapping[str, object]) -> None:
    """The file may give the password one way only: which one would win is not obvious,
    and a rotated password written where it is ignored would go unnoticed."""
    given = [name for name, value in sources.items() if value is not None]
    if len(given) > 1:
        raise ConfigError(
            f"[postgres] gives the password more than once: {' and '.join(given)}",
            hint="Keep one of them (postgres.password_file keeps the password out of this "
            "file) and remove the others; the environment's ACODE_POSTGRES_PASSWORD(_FILE) "
            "still overrides it.",
        )


def _expanded(text: str, key: str) -> Path:
    try:
        return Path(text).expanduser()
    except RuntimeError:  # ~name of no such user
        raise ConfigError(f"{key}: cannot expand the ~ of {text}") from None


def _check_readable(path: Path, what: str) -> None:
    if not path.is_file() or not os.access(path, os.R_OK):
        raise ConfigError(f"{what}: {path} is not a readable file")


def _check_postgres(settings: PostgresSettings, origin: str) -> PostgresSettings:
    for key, value in parse_dsn(settings.dsn, origin)[0].parameters:
        if key in DSN_FILE_PARAMETERS:
            what = f"{origin}: the DSN's {key}"
            _check_readable(_expanded(value, what), what)
    if settings.sslrootcert is not None:
        _check_readable(settings.sslrootcert, "postgres.sslrootcert")
    if settings.sslmode is not None and settings.sslmode not in SSL_MODES:
        raise ConfigError(f"postgres.sslmode must be one of {', '.join(sorted(SSL_MODES))}")
    if settings.pool_min > settings.pool_max:
        raise ConfigError("postgres.pool_min must not exceed postgres.pool_max")
    return settings


def _parse_daemon(raw: Mapping[str, Any]) -> DaemonSettings:
    settings: DaemonSettings = _parse_section(raw, "daemon", DaemonSettings)
    if settings.log_level not in LOG_LEVELS:
        raise ConfigError(f"daemon.log_level must be one of {', '.join(LOG_LEVELS)}")
    if settings.log_format not in LOG_FORMATS:
        raise ConfigError(f"daemon.log_format must be one of {', '.join(LOG_FORMATS)}")
    if settings.verify_window:
        parse_window(settings.verify_window)
    return settings


_WINDOW: Final = re.compile(r"(\d\d):(\d\d)-(\d\d):(\d\d)")


def parse_window(text: str) -> tuple[int, int]:
    """A daily window "HH:MM-HH:MM" as (start, length) in minutes; the end may be past
    midnight ("22:00-04:00") and may be 24:00. Raises ConfigError naming the key."""
    match = _WINDOW.fullmatch(text.strip())
    hours_minutes = [int(part) for part in match.groups()] if match else []
    start = end = -1
    if hours_minutes and all(m < 60 for m in hours_minutes[1::2]):
        start = hours_minutes[0] * 60 + hours_minutes[1]
        end = hours_minutes[2] * 60 + hours_minutes[3]
    if not (0 <= start < 24 * 60 and 0 <= end <= 24 * 60 and start != end):
        raise ConfigError(
            'daemon.verify_window must be a time window such as "01:00-05:00" (local time, '
            "start and end differ), or empty for any time of day",
            hint='Write it as "HH:MM-HH:MM", 24-hour clock; "22:00-04:00" spans midnight.',
        )
    return start, end - start if end > start else end + 24 * 60 - start


def _parse_metrics(raw: Mapping[str, Any]) -> MetricsSettings:
    settings: MetricsSettings = _parse_section(raw, "metrics", MetricsSettings)
    if settings.port > 65535:
        raise ConfigError("metrics.port must be at most 65535")
    return settings


def apply_environment(config: Config, environ: Mapping[str, str]) -> Config:
    """ACODE_POSTGRES_URL / _PASSWORD / _PASSWORD_FILE override the file (AC-024)."""
    postgres, origin = config.postgres, "postgres.dsn"
    if url := environ.get(ENV_POSTGRES_URL):
        origin = ENV_POSTGRES_URL
        dsn, password = split_password(url, ENV_POSTGRES_URL)
        postgres = replace(postgres, dsn=dsn, password=password or postgres.password)
    if password_text := environ.get(ENV_POSTGRES_PASSWORD):
        postgres = replace(postgres, password=Secret(password_text))
    if password_file := environ.get(ENV_POSTGRES_PASSWORD_FILE):
        postgres = replace(
            postgres,
            password=None,
            password_file=_expanded(password_file, ENV_POSTGRES_PASSWORD_FILE),
        )
    return replace(config, postgres=_check_postgres(postgres, origin))


SECTION_SETTINGS: Final[Mapping[str, type[Any]]] = {
    "postgres": PostgresSettings,
    "sync": SyncSettings,
    "daemon": DaemonSettings,
    "metrics": MetricsSettings,
}
SECTIONS: Final = tuple(SECTION_SETTINGS)


def _settings_of(section: str) -> list[str]:
    return [f.name for f in fields(SECTION_SETTINGS[section])]


def _close(name: str, candidates: list[str]) -> str | None:
    matches = difflib.get_close_matches(name, candidates, n=1)
    return matches[0] if matches else None


def _key_hint(section: str, key: str) -> str:
    """For an unknown key: the setting it is probably a typo of, in its own section or
    another one, else the section's settings."""
    own = _settings_of(section)
    if match := _close(key, own):
        return f"Did you mean {section}.{match}?"
    owner = {k: other for other in SECTIONS if other != section for k in _settings_of(other)}
    if key in owner:
        return f"{key} is a setting of [{owner[key]}]: move it below that header."
    if match := _close(key, list(owner)):
        return f"Did you mean {owner[match]}.{match}? (it belongs in [{owner[match]}])"
    return f"The settings of [{section}] are: {', '.join(own)}."


def _section_hint(name: str, value: Any) -> str:
    if not isinstance(value, dict):
        owners = [section for section in SECTIONS if name in _settings_of(section)]
        if owners:
            return f"{name} is a setting of [{owners[0]}]: move it below that header."
    if match := _close(name, list(SECTIONS)):
        return f"Did you mean [{match}]?"
    return "The sections are " + ", ".join(f"[{section}]" for section in SECTIONS) + "."


def parse_config(raw: Mapping[str, Any], source: Path | None = None) -> Config:
    for name, value in raw.items():
        if name not in SECTIONS:
            raise ConfigError(f"[{name}] is not a known section", hint=_section_hint(name, value))
    return Config(
        postgres=_parse_postgres(raw),
        sync=_parse_section(raw, "sync", SyncSettings),
        daemon=_parse_daemon(raw),
        metrics=_parse_metrics(raw),
        source=source,
    )


TOML_HINT: Final = (
    "Fix the syntax at the line and column named above: `[section]` headers, one "
    '`key = value` per line, strings in double quotes ("..."), lists in brackets.'
)


def _unreadable_hint(error: OSError) -> str:
    if isinstance(error, FileNotFoundError):
        return (
            f"Check the path given with --config or ${ENV_CONFIG}; without either, "
            f"~/.config/acode-sync/{CONFIG_NAME}, then /etc/acode-sync/{CONFIG_NAME}, are "
            "read if they exist."
        )
    if isinstance(error, PermissionError):
        return (
            "Give the daemon's user read access without making the file world-readable (it "
            "may hold a password): a group it is in (mode 0640), or a file of its own in "
            f"~/.config/acode-sync/{CONFIG_NAME}, which is read first."
        )
    return "Name a TOML file (the commented sample is config/acode-syncd.toml)."


def read_config_file(path: Path) -> Config:
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as error:
        raise ConfigError(
            f"cannot read {path}: {error.strerror or error}", hint=_unreadable_hint(error)
        ) from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path} is not valid TOML: {error}", hint=TOML_HINT) from None
    return parse_config(raw, source=path)


def find_config_file(explicit: Path | None, environ: Mapping[str, str]) -> Path | None:
    """--config, then $ACODE_SYNC_CONFIG, the user's XDG config dir, /etc/acode-sync/."""
    if explicit is not None:
        return explicit
    if named := environ.get(ENV_CONFIG):
        return Path(named)
    xdg = Path(environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    for candidate in (xdg / "acode-sync" / CONFIG_NAME, Path("/etc/acode-sync") / CONFIG_NAME):
        try:
            if candidate.is_file():
                return candidate
        except OSError as error:  # a directory on the way that the user may not search
            raise ConfigError(
                f"cannot read {candidate}: {error.strerror or error}", hint=_unreadable_hint(error)
            ) from None
    return None


def load_config(explicit: Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    environ = os.environ if environ is None else environ
    path = find_config_file(explicit, environ)
    config = Config() if path is None else read_config_file(path)
    return apply_environment(config, environ)
