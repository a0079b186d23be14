"""`acode-syncd`: the sync daemon's command line."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from acode_sync import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="acode-syncd",
        description="Ship workspaces' outbox records into PostgreSQL.",
    )
    parser.add_argument("--version", action="version", version=f"acode-syncd {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    build_parser().parse_args(argv)
    return 0
