"""The docs cannot drift: every command they show is one the suite can vouch for.

Commands are read from fenced blocks: ```sh blocks (every line that is not a comment,
`\\` continuations joined) and ```console blocks (the `$ ` lines). Each must be:

- `acode ...` or `acode-syncd ...`: accepted by the real argument parser (placeholders
  such as FILE, DIR, ID and USER replaced by sample values); `--help` and `--version` too;
- `make TARGET`: a target of the Makefile;
- `promtool ...`: one of the promtool commands tests/unit/test_monitoring.py runs;
- `python -m MODULE ...` (`.venv/bin/python` included): a module whose `parse_args`
  accepts the arguments;
- a script of the repository (`.ci/run`): an executable file;
- or a host-only command, starting with a line of docs/host-only-commands.txt (systemctl,
  launchctl, ...), whose unit names, LaunchAgent label, repository paths and metrics
  port are still checked.

Usage synopses (```text lines starting with `acode ` or `acode-syncd `) are checked
against the parsers too, with every option, with none, and with each alternative.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import re
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from acode_sync import cli, daemon_cli, launchd
from acode_sync.config import MetricsSettings, read_config_file
from tests.unit.test_monitoring import PROMTOOL_COMMANDS, github_anchors

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted(
    [
        ROOT / "README.md",
        ROOT / "CONTRIBUTING.md",
        *(ROOT / "docs").glob("*.md"),
        ROOT / "config" / "README.md",
        ROOT / "launchd" / "README.md",
        ROOT / "packaging" / "README.md",
        ROOT / "systemd" / "README.md",
    ]
)
HOST_ONLY = ROOT / "docs" / "host-only-commands.txt"
LANGUAGES = {"sh", "console", "text", "toml", "yaml", "json", "ini", "promql", "sql", "python"}
PLACEHOLDERS = {
    "FILE": "/etc/acode-sync/acode-syncd.toml",
    "DIR": "/srv/agents/project",
    "ID": "1",
    "USER": "alice",
    "N": "10",
    "SECONDS": "5",
}
SHELL_BUILTINS = {"cd"}
REPO_DIRS = (".ci/", "config/", "docs/", "launchd/", "packaging/", "src/", "systemd/", "tests/")
SEPARATORS = {"&&", "||", ";", "|", "&"}
_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>\S*)[ \t]*$")
_PLACEHOLDER = re.compile(r"\b(" + "|".join(PLACEHOLDERS) + r")\b")
_UNIT = re.compile(r"^acode-syncd(?:@(?P<instance>[^.\s]*))?(?:\.service)?$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


@dataclass(frozen=True)
class Command:
    where: str
    line: str


def blocks(path: Path) -> Iterator[Block]:
    """The fenced code blocks of a Markdown file, indented ones (in lists) included."""
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        i += 1
        if fence is None:
            continue
        start, indent, body = i, fence["indent"], []
        while i < len(lines) and lines[i].strip() != "```":
            line = lines[i]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            i += 1
        assert i < len(lines), f"{path.name}:{start}: unclosed code block"
        i += 1
        yield Block(path, start, fence["lang"], "\n".join(body) + "\n")


def joined(lines: list[str]) -> Iterator[tuple[int, str]]:
    """Lines with their `\\` continuations joined, numbered from 0."""
    i = 0
    while i < len(lines):
        first, line = i, lines[i]
        while line.endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line[:-1] + " " + lines[i].strip()
        i += 1
        yield first, line


def commands_of(block: Block) -> Iterator[Command]:
    lines = block.text.splitlines()
    if block.lang == "sh":
        for n, line in joined(lines):
            if line.strip() and not line.lstrip().startswith("#"):
                yield Command(f"{block.where}+{n + 1}", line.strip())
    elif block.lang == "console":
        i = 0
        while i < len(lines):
            if lines[i].startswith("$ "):
                first, line = i, lines[i][2:]
                while line.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    line = line[:-1] + " " + lines[i].strip()
                yield Command(f"{block.where}+{first + 1}", line.strip())
            i += 1


@cache
def all_blocks() -> tuple[Block, ...]:
    return tuple(block for path in DOCS for block in blocks(path))


@cache
def all_commands() -> tuple[Command, ...]:
    return tuple(command for block in all_blocks() for command in commands_of(block))


@cache
def host_only_entries() -> tuple[tuple[str, ...], ...]:
    lines = HOST_ONLY.read_text().splitlines()
    return tuple(tuple(line.split()) for line in lines if line.strip() and not line.startswith("#"))


def split_commands(line: str) -> list[list[str]]:
    """Shell words of each simple command of a line (split at &&, ||, ;, |), without
    comments, `sudo` and leading VAR=value assignments."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars="&|;")
    lexer.whitespace_split = True
    parts: list[list[str]] = [[]]
    for token in lexer:
        if token in SEPARATORS:
            parts.append([])
        else:
            parts[-1].append(token)
    simple = []
    for words in parts:
        while words and (words[0] == "sudo" or re.match(r"^[A-Za-z_]\w*=", words[0])):
            words = words[1:]
        if words:
            simple.append(words)
    return simple


def sampled(words: list[str]) -> list[str]:
    return [_PLACEHOLDER.sub(lambda m: PLACEHOLDERS[m[1]], word) for word in words]


def parse_error(parser: argparse.ArgumentParser, args: list[str]) -> str | None:
    """None when the parser accepts the arguments (or exits 0: --help, --version)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            parser.parse_args(args)
        except SystemExit as stop:
            if stop.code not in (0, None):
                return err.getvalue().strip().splitlines()[-1]
    return None


@cache
def make_targets() -> frozenset[str]:
    text = (ROOT / "Makefile").read_text()
    return frozenset(re.findall(r"^([A-Za-z0-9_][A-Za-z0-9_.-]*)\s*:(?!=)", text, re.M))


def check_make(words: list[str]) -> str | None:
    targets = [w for w in words[1:] if not w.startswith("-") and "=" not in w]
    if not targets:
        return "make without a target"
    unknown = [t for t in targets if t not in make_targets()]
    return f"no Makefile target {', '.join(unknown)}" if unknown else None


def check_module(words: list[str]) -> str | None:
    if len(words) < 3 or words[1] != "-m":
        return "only `python -m MODULE` is checked"
    module = importlib.import_module(words[2])
    parse_args: Callable[[list[str]], object] | None = getattr(module, "parse_args", None)
    if parse_args is None:
        return f"{words[2]} has no parse_args() to check its arguments with"
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            parse_args(words[3:])
        except SystemExit as stop:
            if stop.code not in (0, None):
                return err.getvalue().strip().splitlines()[-1]
    return None


def host_only_entry(words: list[str]) -> tuple[str, ...] | None:
    for entry in host_only_entries():
        if tuple(words[: len(entry)]) == entry:
            return entry
    return None


def check_host_details(words: list[str]) -> str | None:
    """What a host-only command still says about this repository."""
    for word in words:
        if words[0] in ("systemctl", "journalctl", "systemd-analyze") and word.startswith("acode"):
            unit = _UNIT.match(word)
            if unit is None:
                return f"{word}: not a unit of systemd/"
            name = "acode-syncd@.service" if unit["instance"] is not None else "acode-syncd.service"
            if not (ROOT / "systemd" / name).is_file():
                return f"{word}: no unit systemd/{name}"
        if "dev.acode." in word and not word.endswith((launchd.LABEL, f"{launchd.LABEL}.plist")):
            return f"{word}: the LaunchAgent's label is {launchd.LABEL}"
        if word.startswith(REPO_DIRS) and not list(ROOT.glob(word.rstrip("/"))):
            return f"{word}: no such file in the repository"
        port = re.search(r"(?:127\.0\.0\.1|localhost):(\d+)/metrics", word)
        if port and int(port[1]) != MetricsSettings().port:
            return f"{word}: the metrics port is {MetricsSettings().port}"
    if words[:2] == ["docker", "run"]:
        published = [
            words[i + 1] for i, word in enumerate(words[:-1]) if word in ("-p", "--publish")
        ]
        image_port = read_config_file(ROOT / "packaging" / "container.toml").metrics.port
        wrong = [p for p in published if p.rpartition(":")[2] != str(image_port)]
        if wrong:
            return f"-p {wrong[0]}: the image's metrics port is {image_port}"
    return None


def check(words: list[str]) -> str | None:
    """None if the command is vouched for, else why not."""
    program = words[0]
    if program.startswith(".venv/bin/"):
        program = program.removeprefix(".venv/bin/")
        words = [program, *words[1:]]
    if program == "acode":
        return parse_error(cli.build_parser(), sampled(words[1:]))
    if program == "acode-syncd":
        return parse_error(daemon_cli.build_parser(), sampled(words[1:]))
    if program == "make":
        return check_make(sampled(words))
    if program == "promtool":
        return (
            None if tuple(words) in PROMTOOL_COMMANDS else "not a promtool command the suite runs"
        )
    if program in ("python", "python3"):
        return check_module(words)
    if program in SHELL_BUILTINS:
        return None
    if host_only_entry(words) is not None:
        return check_host_details(words)
    if program.startswith(REPO_DIRS):
        path = ROOT / program
        ok = path.is_file() and os.access(path, os.X_OK)
        return None if ok else f"{program} is not an executable file of the repository"
    return "neither checked by the suite nor listed in docs/host-only-commands.txt"


def failures(line: str) -> list[str]:
    return [f"{' '.join(w)}: {e}" for w in split_commands(line) if (e := check(w)) is not None]


def synopsis_variants(line: str) -> Iterator[str]:
    """A usage line with each alternative `(a | b)`, with every `[option]` and with none."""
    group = re.search(r"\(([^()]*\|[^()]*)\)", line)
    if group is not None:
        for choice in group[1].split("|"):
            yield from synopsis_variants(
                line[: group.start()] + choice.strip() + line[group.end() :]
            )
        return
    line = re.sub(r"(\w+)\.\.\.", r"\1 \1", line)
    yield re.sub(r"\[([^\[\]]*)\]", r"\1", line)
    yield re.sub(r"\s*\[[^\[\]]*\]", "", line)


def test_code_blocks_use_known_languages_and_console_for_transcripts() -> None:
    for block in all_blocks():
        assert block.lang in LANGUAGES, f"{block.where}: ```{block.lang or ''} block"
        lines = block.text.splitlines()
        if block.lang in ("sh", "text"):
            prompts = [line for line in lines if line.startswith("$ ")]
            assert not prompts, f"{block.where}: a transcript with `$ ` belongs in ```console"
        if block.lang == "console":
            assert lines[0].startswith("$ "), f"{block.where}: a ```console block starts with `$ `"


def test_every_documented_command_is_checked() -> None:
    problems = [f"{c.where}: {f}" for c in all_commands() for f in failures(c.line)]
    assert not problems, "\n".join(problems)
    assert len(all_commands()) > 40


def test_every_host_only_entry_is_used() -> None:
    used = {
        host_only_entry(words)
        for command in all_commands()
        for words in split_commands(command.line)
    }
    stale = [" ".join(entry) for entry in host_only_entries() if entry not in used]
    assert not stale, f"docs/host-only-commands.txt: no documented command starts with {stale}"
    checked = {"acode", "acode-syncd", "make", "promtool", "python", "python3"}
    assert not [e for e in host_only_entries() if e[0] in checked | {"sudo"}]


def test_a_doc_with_sudo_says_how_to_run_it_as_root() -> None:
    """`sudo` is absent from a root shell (a container, a fresh machine): every document
    that shows it says to leave it out there."""
    with_sudo = {
        block.path
        for block in all_blocks()
        for command in commands_of(block)
        if re.search(r"(^|&&|\|\||;)\s*sudo\s", command.line)
    }
    assert with_sudo
    silent = [p.relative_to(ROOT) for p in with_sudo if "in a root shell" not in p.read_text()]
    assert not silent, f"sudo without the note for a root shell: {silent}"


def test_usage_synopses_parse() -> None:
    synopses = [
        (block.where, line)
        for block in all_blocks()
        if block.lang == "text"
        for line in block.text.splitlines()
        if line.startswith(("acode ", "acode-syncd "))
    ]
    assert len(synopses) >= 10
    problems = [
        f"{where}: {variant}: {error}"
        for where, line in synopses
        for variant in synopsis_variants(line)
        if (error := check(sampled(shlex.split(variant)))) is not None
    ]
    assert not problems, "\n".join(problems)


def test_every_subcommand_has_a_synopsis() -> None:
    synopses = "\n".join(block.text for block in all_blocks() if block.lang == "text")
    for prog, parser in (("acode-syncd", daemon_cli.build_parser()),):
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        for name in subparsers.choices:
            assert f"{prog} {name}" in synopses, f"no usage line for `{prog} {name}`"


def test_relative_links_and_anchors_resolve() -> None:
    problems = []
    for path in DOCS:
        text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            if not linked.exists():
                problems.append(f"{path.name}: {target}: no such file")
            elif (
                anchor
                and linked.suffix == ".md"
                and anchor not in github_anchors(linked.read_text())
            ):
                problems.append(f"{path.name}: {target}: no such heading")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "line",
    [
        "acode db nosuch",
        "acode db outbox retry --all-failed --nope",
        "acode-syncd install-launchd --bin",
        "acode-syncd run --config",
        "make nosuch-target",
        "promtool check rules elsewhere.yml",
        "frobnicate --all",
        "cd /tmp && acode db frob",
        "sudo systemctl restart acode-syncd-old@USER",
        "systemctl --user restart acode-syncd.service && systemd-analyze verify systemd/nope",
        "launchctl kickstart -k gui/501/dev.acode.other",
        "curl -s http://127.0.0.1:9100/metrics",
        ".ci/nope",
        "python -m tests.bench.bench_store --no-such-option",
        "docker build -f packaging/Containerfile .",
        "docker run -p 127.0.0.1:9100:9100 acode-syncd",
    ],
)
def test_the_check_refuses_what_it_cannot_vouch_for(line: str) -> None:
    assert failures(line)


@pytest.mark.parametrize(
    "line",
    [
        "acode db outbox retry --workspace DIR ID ID  # a comment",
        "ACODE_POSTGRES_URL=postgresql://x/y acode-syncd check-config --config FILE",
        "cd ~/project && acode-syncd run",
        "acode --version",
        "acode-syncd reload --help",
        "make run WORKSPACE=DIR",
        "sudo systemctl enable --now acode-syncd@USER",
        "launchctl kill SIGHUP gui/$(id -u)/dev.acode.acode-syncd",
        "docker run -d -p 127.0.0.1:9464:9464 acode-syncd",
    ],
)
def test_the_check_accepts_real_commands(line: str) -> None:
    assert failures(line) == []


def test_synopsis_variants() -> None:
    assert sorted(
        synopsis_variants("acode db outbox retry [--workspace DIR] (ID... | --all-failed)")
    ) == [
        "acode db outbox retry --all-failed",
        "acode db outbox retry --workspace DIR --all-failed",
        "acode db outbox retry --workspace DIR ID ID",
        "acode db outbox retry ID ID",
    ]


def test_contributing_names_every_test_directory() -> None:
    text = (ROOT / "CONTRIBUTING.md").read_text()
    directories = sorted(p.name for p in (ROOT / "tests").iterdir() if (p / "__init__.py").exists())
    assert directories
    missing = [d for d in directories if f"`tests/{d}`" not in text]
    assert not missing, f"CONTRIBUTING.md does not name tests/{missing}"
