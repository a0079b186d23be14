"""The daemon's state directory: its lock and its status file, what `acode db status`
and `acode-syncd reload` read.

One directory per daemon instance: [daemon] state_dir, else $RUNTIME_DIRECTORY (systemd's
RuntimeDirectory=), else a directory named after the configuration file under
$XDG_RUNTIME_DIR/acode-syncd or ~/.local/state/acode-syncd. A running daemon holds an
exclusive flock on its `daemon.lock`, so a second one on the same directory is refused.
The status file is written atomically (a private temporary file with an unpredictable
name, created exclusively and renamed over the old one; mode 0600 whatever the umask).
It holds no secret.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import stat
import tempfile
import tomllib
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path
from typing import Any, Final

from acode_sync.config import DaemonSettings, find_config_file, load_config
from acode_sync.errors import ConfigError

STATUS_NAME: Final = "status.json"
STATUS_MODE: Final = 0o600
LOCK_NAME: Final = "daemon.lock"
DEFAULT_INSTANCE: Final = "default"


def instance_name(config_path: Path | None) -> str:
    """The state directory's name for a daemon run with this configuration file (none:
    `default`): the file's stem and a digest of its absolute path, so two files called
    acode-syncd.toml in different places get different directories."""
    if config_path is None:
        return DEFAULT_INSTANCE
    absolute = config_path.absolute()
    digest = hashlib.sha256(str(absolute).encode()).hexdigest()[:8]
    return f"{absolute.stem}-{digest}"


def state_dir(
    settings: DaemonSettings, environ: Mapping[str, str], config_path: Path | None = None
) -> Path:
    if settings.state_dir is not None:
        return settings.state_dir
    if runtime := environ.get("RUNTIME_DIRECTORY"):
        return Path(runtime.split(":")[0])
    if xdg := environ.get("XDG_RUNTIME_DIR"):
        base = Path(xdg) / "acode-syncd"
    else:
        base = Path.home() / ".local" / "state" / "acode-syncd"
    return base / instance_name(config_path)


def find_state_dir(
    explicit: Path | None, environ: Mapping[str, str]
) -> tuple[Path, ConfigError | None]:
    """Where the daemon run with this configuration keeps its state, and the file's
    error if it is invalid: an invalid file still names the daemon it belongs to (its
    `state_dir` if that much can be read, else its path)."""
    path = find_config_file(explicit, environ)
    try:
        return state_dir(load_config(explicit, environ).daemon, environ, path), None
    except ConfigError as error:
        return state_dir(_readable_state_dir(path), environ, path), error


def _readable_state_dir(path: Path | None) -> DaemonSettings:
    try:
        raw = tomllib.loads(path.read_text()) if path is not None else {}
    except (OSError, ValueError):
        return DaemonSettings()
    daemon = raw.get("daemon")
    named = daemon.get("state_dir") if isinstance(daemon, dict) else None
    try:
        return DaemonSettings(
            state_dir=Path(named).expanduser() if isinstance(named, str) else None
        )
    except RuntimeError:  # ~name of no such user
        return DaemonSettings()


def hold_state_dir(directory: Path) -> int:
    """Take the state directory for this process (an flock the kernel drops when the
    process ends); the descriptor, to keep open. ACODE-DB-007 if another daemon has it."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(
        directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
    )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ConfigError(
            f"another acode-syncd (pid {holder}) already runs with the state directory {directory}",
            hint="Give each daemon its own configuration file or its own [daemon] state_dir "
            "(and metrics port), or stop the other one.",
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def write_status(directory: Path, status: Mapping[str, Any]) -> None:
    """Raises OSError, also when status.json is a symbolic link (it is left alone)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    final = directory / STATUS_NAME
    with suppress(FileNotFoundError):
        if stat.S_ISLNK(final.lstat().st_mode):
            raise OSError(errno.ELOOP, f"{final} is a symbolic link: not replacing it")
    # mkstemp: O_CREAT | O_EXCL | O_NOFOLLOW, a random name, mode 0600.
    fd, temporary = tempfile.mkstemp(prefix=f".{STATUS_NAME}.", dir=directory)
    try:
        with os.fdopen(fd, "w") as file:
            os.fchmod(file.fileno(), STATUS_MODE)
            file.write(json.dumps(status, indent=1, sort_keys=True))
        Path(temporary).replace(final)
    except BaseException:
        with suppress(OSError):
            Path(temporary).unlink()
        raise


def read_status(directory: Path) -> dict[str, Any] | None:
    """The status of a running daemon, or None (no file, or its process is gone)."""
    try:
        status: dict[str, Any] = json.loads((directory / STATUS_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not _alive(int(status.get("pid", 0))):
        return None
    return status


def remove_status(directory: Path) -> None:
    (directory / STATUS_NAME).unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
