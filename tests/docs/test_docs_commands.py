"""Every `ftpipe ...` command written in README.md and docs/ parses against the real CLI.

Each command line is split like a shell would, and handed to the CLI's own parser (click's
`make_context`), so a renamed command, a removed option or a misspelt flag in the docs fails here.
The commands are parsed here, in seconds; tests/docs/test_docs_run.py (slow) runs each of them.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
import typer.main

from conftest import REPO
from ftpipe.cli.main import app

DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_INLINE = re.compile(r"`(?:\.venv/bin/)?(ftpipe [^`]+)`")
_LINE = re.compile(r"^\s*(?:\$ )?(?:\.venv/bin/)?(ftpipe\s.*)$")


def doc_commands() -> list[tuple[str, str]]:
    """(file:line, command) for every `ftpipe ...` in inline code, and every line of a code block
    (fenced, or indented by 4 spaces) that starts with `ftpipe` (a prose line never does: one that
    starts with `ftpipe` is the tail of a quoted error message broken over two lines)."""
    found: list[tuple[str, str]] = []
    for path in DOC_FILES:
        fenced = False
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.lstrip().startswith("```"):
                fenced = not fenced
                continue
            candidates = _INLINE.findall(line)
            m = _LINE.match(line)
            in_code = fenced or line.startswith(("    ", "\t"))
            if m and in_code and not candidates:
                candidates = [m.group(1)]
            for cmd in candidates:
                cmd = cmd.split(" #")[0].strip()
                if "<" in cmd or "..." in cmd or "|" in cmd:
                    continue  # a placeholder or a pattern, not a runnable line
                cmd = cmd.rstrip(".,;:")
                found.append((f"{path.relative_to(REPO)}:{lineno}", cmd))
    return found


COMMANDS = doc_commands()


def test_docs_hold_commands() -> None:
    assert len(COMMANDS) >= 30


@pytest.mark.parametrize("where, command", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_doc_command_parses(where: str, command: str) -> None:
    argv = shlex.split(command)[1:]
    group = typer.main.get_command(app)
    ctx = group.make_context("ftpipe", list(argv), resilient_parsing=False)
    # Walk down the command groups (e.g. `runs show`, `serve stop`) to the leaf command, whose
    # make_context raises on an unknown option or a bad value.
    cmd = group
    while isinstance(cmd, click.Group):
        rest = [*_pending(ctx), *ctx.args]
        assert rest, f"{where}: `{command}` names no command"
        name, sub, args = cmd.resolve_command(ctx, rest)
        assert sub is not None, f"{where}: unknown command {name!r} in `{command}`"
        ctx = sub.make_context(name, list(args), parent=ctx, resilient_parsing=False)
        cmd = sub


def _pending(ctx: click.Context) -> list[str]:
    # The sub-command and its arguments a group left unparsed (renamed in click 8.2).
    return list(getattr(ctx, "_protected_args", None) or getattr(ctx, "protected_args", []) or [])
