"""sd_notify for Type=notify units: READY, RELOADING, STOPPING, STATUS, WATCHDOG.

Outside systemd (no NOTIFY_SOCKET) every call is a no-op.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sdnotify


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Half of WATCHDOG_USEC, if the watchdog is on and meant for this process."""
    usec = environ.get("WATCHDOG_USEC")
    owner = environ.get("WATCHDOG_PID")
    if not usec or (owner and owner != str(pid)):
        return None
    return int(usec) / 1_000_000 / 2


class Notifier:
    def __init__(self, environ: Mapping[str, str]) -> None:
        self.enabled = bool(environ.get("NOTIFY_SOCKET"))
        self._notifier: Any = sdnotify.SystemdNotifier() if self.enabled else None

    def _send(self, message: str) -> None:
        if self._notifier is not None:
            self._notifier.notify(message)

    def ready(self, status: str) -> None:
        self._send(f"READY=1\nSTATUS={status}")

    def reloading(self) -> None:
        self._send("RELOADING=1")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def status(self, text: str) -> None:
        self._send(f"STATUS={text}")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")
