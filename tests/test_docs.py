"""The command line and the docs agree.

Every command and option has help text and a place in docs/commands.md, and every
``tunefleet`` command shown in README.md or docs/ parses.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from ops.cli import cli
from ops.paths import project_root

ROOT = project_root()
DOC_FILES = sorted([ROOT / "README.md", ROOT / "README.ko.md", *(ROOT / "docs").glob("*.md")])
COMMANDS_DOC = ROOT / "docs" / "commands.md"
# Values that stand in for the placeholders of synopsis lines; others become "x".
PLACEHOLDERS = {"N": "1", "FILE": str(ROOT / "README.md")}


def walk(command: click.Command, path: tuple[str, ...] = ("tunefleet",)) -> Iterator[tuple[str, click.Command]]:
    yield " ".join(path), command
    if isinstance(command, click.Group):
        for name, sub in sorted(command.commands.items()):
            yield from walk(sub, (*path, name))


COMMANDS = list(walk(cli))


def section_of(text: str, heading: str) -> str:
    """Return the Markdown section under ``## heading`` up to the next heading of that level."""
    match = re.search(rf"^## `{re.escape(heading)}`\s*$(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    return match.group(1) if match else ""


@pytest.mark.parametrize("path,command", COMMANDS, ids=[path for path, _ in COMMANDS])
def test_command_has_help(path, command):
    assert (command.help or "").strip(), f"{path} has no help text"


@pytest.mark.parametrize("path,command", COMMANDS, ids=[path for path, _ in COMMANDS])
def test_options_have_help(path, command):
    for parameter in command.params:
        if isinstance(parameter, click.Option) and parameter.name not in ("help", "version"):
            assert (parameter.help or "").strip(), f"{path} {parameter.opts[0]} has no help text"


@pytest.mark.parametrize("path,command", COMMANDS, ids=[path for path, _ in COMMANDS])
def test_command_documented(path, command):
    section = section_of(COMMANDS_DOC.read_text(), path)
    assert section, f"docs/commands.md has no section '## `{path}`'"
    for parameter in command.params:
        if parameter.name in ("help", "version"):
            continue
        if isinstance(parameter, click.Option):
            assert any(opt in section for opt in parameter.opts), f"{path} {parameter.opts[0]} is not in its section"
        else:
            assert parameter.human_readable_name in section, f"{path} argument {parameter.name} is not in its section"


def shown_commands() -> list[tuple[str, str]]:
    """Return (file, line) for each ``tunefleet ...`` line inside a shell code block of the docs."""
    found = []
    for path in DOC_FILES:
        in_block = False
        for line in path.read_text().splitlines():
            if line.startswith("```"):
                in_block = line.strip() in ("```sh", "```bash", "```console")
                continue
            stripped = line.strip().removeprefix("$ ")
            if in_block and stripped.startswith("tunefleet "):
                found.append((path.name, stripped))
    return found


def runnable(line: str) -> list[str]:
    """Turn a synopsis line into arguments: drop comments and [optional] parts, pick the first alternative."""
    line = line.split(" # ")[0]
    line = line.split("  #")[0]
    while re.search(r"\[[^\[\]]*\]", line):
        line = re.sub(r"\[[^\[\]]*\]", "", line)
    line = re.sub(r"(\S+?)\|\S+", r"\1", line)
    return [PLACEHOLDERS.get(token, "x") if re.fullmatch(r"[A-Z][A-Z_]*(\[.*\])?", token) else token
            for token in shlex.split(line)[1:]]


def parse(arguments: list[str]) -> None:
    """Parse arguments the way ``tunefleet`` would, without running any command."""
    command: click.Command = cli
    name = "tunefleet"
    while True:
        context = command.make_context(name, list(arguments))
        if not isinstance(command, click.Group):
            return
        remaining = [*context._protected_args, *context.args]
        name, command, arguments = command.resolve_command(context, remaining)
        arguments = remaining[1:]


SHOWN = shown_commands()


def test_docs_show_commands():
    assert len(SHOWN) >= 10


@pytest.mark.parametrize("source,line", SHOWN, ids=[f"{source}:{line}" for source, line in SHOWN])
def test_shown_command_parses(source, line):
    try:
        parse(runnable(line))
    except click.UsageError as error:
        pytest.fail(f"{source}: '{line}' does not parse: {error.format_message()}")
