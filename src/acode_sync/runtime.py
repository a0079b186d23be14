"""The daemon's status file: what `acode db status` and `acode-syncd reload` read.

Written atomically in the state directory (a private temporary file with an unpredictable
name, created exclusively and renamed over the old one; mode 0600 whatever the umask):
[daemon] state_dir, else $RUNTIME_DIRECTORY (systemd's RuntimeDirectory=), else
$XDG_RUNTIME_DIR/acode-syncd, else ~/.local/state/acode-syncd. It holds no secret.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path
from typing import Any, Final

from acode_sync.config import DaemonSettings

STATUS_NAME: Final = "status.json"
STATUS_MODE: Final = 0o600


def state_dir(settings: DaemonSettings, environ: Mapping[str, str]) -> Path:
    if settings.state_dir is not None:
        return settings.state_dir
    if runtime := environ.get("RUNTIME_DIRECTORY"):
        return Path(runtime.split(":")[0])
    if xdg := environ.get("XDG_RUNTIME_DIR"):
        return Path(xdg) / "acode-syncd"
    return Path.home() / ".local" / "state" / "acode-syncd"


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
