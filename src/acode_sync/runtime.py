"""The daemon's status file: what `acode db status` and `acode-syncd reload` read.

Written atomically (a temporary file renamed over the old one) in the state directory:
[daemon] state_dir, else $RUNTIME_DIRECTORY (systemd's RuntimeDirectory=), else
$XDG_RUNTIME_DIR/acode-syncd, else ~/.local/state/acode-syncd. It holds no secret.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from acode_sync.config import DaemonSettings

STATUS_NAME: Final = "status.json"


def state_dir(settings: DaemonSettings, environ: Mapping[str, str]) -> Path:
    if settings.state_dir is not None:
        return settings.state_dir
    if runtime := environ.get("RUNTIME_DIRECTORY"):
        return Path(runtime.split(":")[0])
    if xdg := environ.get("XDG_RUNTIME_DIR"):
        return Path(xdg) / "acode-syncd"
    return Path.home() / ".local" / "state" / "acode-syncd"


def write_status(directory: Path, status: Mapping[str, Any]) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = directory / f".{STATUS_NAME}.{os.getpid()}"
    temporary.write_text(json.dumps(status, indent=1, sort_keys=True))
    temporary.replace(directory / STATUS_NAME)


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
