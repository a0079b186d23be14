"""Fault hooks for the engine's test-only fault points (before_commit, after_commit,
after_mark): do something to the world the Nth time a point is reached."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class AtNth:
    """Runs `action` the `nth` time the engine reaches `point`; `seen` counts them all."""

    point: str
    nth: int
    action: Callable[[], object]
    seen: int = 0

    def __call__(self, reached: str) -> None:
        if reached == self.point:
            self.seen += 1
            if self.seen == self.nth:
                self.action()
