"""Configuration: frozen settings read from TOML and the environment.

Only the edges (the CLIs, the daemon) call `load_config`; the core takes the settings
objects. Every key has a default; an invalid value raises ConfigError naming its key.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from acode_sync.errors import ConfigError
from acode_sync.secret import Secret

ENV_POSTGRES_URL: Final = "ACODE_POSTGRES_URL"
ENV_POSTGRES_PASSWORD: Final = "ACODE_POSTGRES_PASSWORD"  # noqa: S105 - a variable name
ENV_POSTGRES_PASSWORD_FILE: Final = "ACODE_POSTGRES_PASSWORD_FILE"  # noqa: S105
ENV_CONFIG: Final = "ACODE_SYNC_CONFIG"
CONFIG_NAME: Final = "acode-syncd.toml"
SSL_MODES: Final = frozenset({"disable", "allow", "prefer", "require", "verify-ca", "verify-full"})
LOCAL_HOSTS: Final = frozenset({"localhost", "127.0.0.1", "::1", ""})


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

    def resolved_password(self) -> str | None:
        if self.password is not None:
            return self.password.reveal()
        if self.password_file is not None:
            try:
                return self.password_file.read_text().strip()
            except OSError as error:
                raise ConfigError(
                    f"postgres.password_file: cannot read {self.password_file}: "
                    f"{error.strerror or type(error).__name__}"
                ) from None
        return None

    def connect_dsn(self) -> str:
        """The DSN with sslmode/sslrootcert added; still without the password."""
        parts = urlsplit(self.dsn)
        query = dict(parse_qsl(parts.query))
        if self.sslmode:
            query["sslmode"] = self.sslmode
        if self.sslrootcert:
            query["sslrootcert"] = str(self.sslrootcert)
        return urlunsplit(parts._replace(query=urlencode(query)))

    def host_description(self) -> str:
        """Host, port and database, for logs and status: no user, no password."""
        parts = urlsplit(self.dsn)
        host = parts.netloc.rpartition("@")[2] or "localhost"
        return f"{host}{parts.path or '/'}"

    def effective_sslmode(self) -> str | None:
        return self.sslmode or dict(parse_qsl(urlsplit(self.dsn).query)).get("sslmode")

    def is_remote_without_tls(self) -> bool:
        hosts = {
            h.rpartition(":")[0] or h
            for h in urlsplit(self.dsn).netloc.rpartition("@")[2].split(",")
        }
        remote = any(h.strip("[]") not in LOCAL_HOSTS and not h.startswith("/") for h in hosts)
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
    drain_timeout_seconds: float = 20.0
    batches_per_turn: int = 10
    # Workspaces shipping batches at once (also bounded by postgres.pool_max). More than
    # about twice the cores only adds memory and contention.
    max_concurrent_syncs: int = 4
    broken_retry_seconds: float = 30.0
    log_level: str = "info"
    log_format: str = "auto"
    state_dir: Path | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class MetricsSettings:
    """[metrics]: the Prometheus endpoint."""

    enabled: bool = True
    address: str = "127.0.0.1"
    port: int = 9464


@dataclass(frozen=True, kw_only=True, slots=True)
class Config:
    postgres: PostgresSettings = field(default_factory=PostgresSettings)
    sync: SyncSettings = field(default_factory=SyncSettings)
    daemon: DaemonSettings = field(default_factory=DaemonSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    source: Path | None = None


def split_password(dsn: str) -> tuple[str, Secret | None]:
    """Remove a password from a postgres URL (user info or ?password=); return both parts."""
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ConfigError(
            "postgres.dsn must be a postgresql:// URL",
            hint="Write it as postgresql://user@host:5432/dbname and give the password apart.",
        )
    password = None
    userinfo, at, hostinfo = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        user, _, raw = userinfo.partition(":")
        password = Secret(unquote(raw))
        parts = parts._replace(netloc=f"{user}@{hostinfo}")
    query = parse_qsl(parts.query, keep_blank_values=True)
    kept = [(k, v) for k, v in query if k != "password"]
    if len(kept) != len(query):
        password = Secret(next(v for k, v in query if k == "password"))
        parts = parts._replace(query=urlencode(kept, quote_via=quote))
    return urlunsplit(parts), password


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
    if kind in ("int", "float"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise wrong
        if kind == "int" and not isinstance(value, int):
            raise wrong
        return value if kind == "int" else float(value)
    if kind.startswith("tuple"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key} must be a list of strings")
        paths = "Path" in kind
        return tuple(Path(v).expanduser() if paths else v for v in value)
    if not isinstance(value, str):
        raise wrong
    if kind.startswith("Path"):
        return Path(value).expanduser()
    if kind.startswith("Secret"):
        return Secret(value)
    return value


def _parse_section(raw: Mapping[str, Any], name: str, cls: type[Any]) -> Any:
    table = _section(raw, name)
    kinds = {f.name: str(f.type) for f in fields(cls)}
    values = {}
    for key, value in table.items():
        if key not in kinds:
            raise ConfigError(f"{name}.{key} is not a known setting")
        values[key] = _convert(f"{name}.{key}", kinds[key], value)
        if isinstance(values[key], int | float) and not isinstance(values[key], bool):
            minimum = 0 if key in _MAY_BE_ZERO else 1e-9
            if values[key] < minimum:
                raise ConfigError(f"{name}.{key} must be {'>= 0' if minimum == 0 else 'positive'}")
    return cls(**values)


_MAY_BE_ZERO = frozenset({"pool_min", "max_depth", "port", "statement_cache_size"})
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
LOG_FORMATS: Final = ("auto", "json", "console")


def _parse_postgres(raw: Mapping[str, Any]) -> PostgresSettings:
    settings: PostgresSettings = _parse_section(raw, "postgres", PostgresSettings)
    dsn, password = split_password(settings.dsn)
    settings = replace(settings, dsn=dsn, password=settings.password or password)
    return _check_postgres(settings)


def _check_postgres(settings: PostgresSettings) -> PostgresSettings:
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
    return settings


def _parse_metrics(raw: Mapping[str, Any]) -> MetricsSettings:
    settings: MetricsSettings = _parse_section(raw, "metrics", MetricsSettings)
    if settings.port > 65535:
        raise ConfigError("metrics.port must be at most 65535")
    return settings


def apply_environment(config: Config, environ: Mapping[str, str]) -> Config:
    """ACODE_POSTGRES_URL / _PASSWORD / _PASSWORD_FILE override the file (AC-024)."""
    postgres = config.postgres
    if url := environ.get(ENV_POSTGRES_URL):
        dsn, password = split_password(url)
        postgres = replace(postgres, dsn=dsn, password=password or postgres.password)
    if password_text := environ.get(ENV_POSTGRES_PASSWORD):
        postgres = replace(postgres, password=Secret(password_text))
    if password_file := environ.get(ENV_POSTGRES_PASSWORD_FILE):
        postgres = replace(postgres, password=None, password_file=Path(password_file).expanduser())
    return replace(config, postgres=_check_postgres(postgres))


SECTIONS: Final = ("postgres", "sync", "daemon", "metrics")


def parse_config(raw: Mapping[str, Any], source: Path | None = None) -> Config:
    for name in raw:
        if name not in SECTIONS:
            raise ConfigError(f"[{name}] is not a known section")
    return Config(
        postgres=_parse_postgres(raw),
        sync=_parse_section(raw, "sync", SyncSettings),
        daemon=_parse_daemon(raw),
        metrics=_parse_metrics(raw),
        source=source,
    )


def read_config_file(path: Path) -> Config:
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror or error}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path} is not valid TOML: {error}") from None
    return parse_config(raw, source=path)


def find_config_file(explicit: Path | None, environ: Mapping[str, str]) -> Path | None:
    """--config, then $ACODE_SYNC_CONFIG, the user's XDG config dir, /etc/acode-sync/."""
    if explicit is not None:
        return explicit
    if named := environ.get(ENV_CONFIG):
        return Path(named)
    xdg = Path(environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    for candidate in (xdg / "acode-sync" / CONFIG_NAME, Path("/etc/acode-sync") / CONFIG_NAME):
        if candidate.is_file():
            return candidate
    return None


def load_config(explicit: Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    environ = os.environ if environ is None else environ
    path = find_config_file(explicit, environ)
    config = Config() if path is None else read_config_file(path)
    return apply_environment(config, environ)
