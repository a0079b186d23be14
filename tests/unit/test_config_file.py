"""config/acode-syncd.toml documents every key with its default."""

from __future__ import annotations

import re
import tomllib
from dataclasses import fields
from pathlib import Path

from acode_sync.config import Config, parse_config, read_config_file

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "config" / "acode-syncd.toml"
EXAMPLES = {
    "password",
    "password_file",
    "sslmode",
    "sslrootcert",
    "roots",
    "state_dir",
    "gather_seconds",
}  # no default (gather_seconds: one by the connection's kind)
SETTING = re.compile(r"^# (\w+) = (.+)$")


def uncommented() -> dict[str, dict[str, object]]:
    sections: dict[str, dict[str, object]] = {}
    current: dict[str, object] = {}
    for line in SAMPLE.read_text().splitlines():
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        elif match := SETTING.match(line):
            current[match[1]] = tomllib.loads(f"v = {match[2]}")["v"]
    return sections


def test_the_sample_parses_as_it_is() -> None:
    assert read_config_file(SAMPLE).postgres == Config().postgres


def test_every_setting_is_shown_with_its_default() -> None:
    sections = uncommented()
    defaults = Config()
    for name in ("postgres", "sync", "daemon", "metrics"):
        shown = sections[name]
        settings = getattr(defaults, name)
        for field in fields(settings):
            assert field.name in shown, f"{name}.{field.name} is not in the sample config"
    values = {
        name: {k: v for k, v in shown.items() if k not in EXAMPLES}
        for name, shown in sections.items()
    }
    assert parse_config(values) == Config()
