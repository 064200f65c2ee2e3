"""Shared CLI plumbing: the common options, config loading, delegation to stage environments, output.

Commands stay thin: parse -> `load()` -> maybe `delegate()` -> call the stage -> `show_result()`.
Every stage command is built from its row of the stage table (`ftpipe/cli/stage_command.py`).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ftpipe.core.logs import console_err_stream, console_stream

console = Console(file=console_stream, highlight=False)
err_console = Console(file=console_err_stream, highlight=False)

ConfigOpt = Annotated[
    Path, typer.Option("--config", "-c", help="Config YAML (e.g. debug_config.yaml).")
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override a config value: section.key=value (repeatable)."),
]
RunOpt = Annotated[
    Optional[str], typer.Option("--run", help="Run name (default: the latest run, logged).")
]
RuntimeOpt = Annotated[
    Optional[str],
    typer.Option("--runtime", help="local (stage venvs) or compose (Docker services)."),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Rerun even when up to date.")]

DEFAULT_CONFIG = Path("config.yaml")


def setup_logging(verbose: bool = False) -> None:
    """Show ftpipe's INFO logs on the console (warnings from other libraries too)."""
    root = logging.getLogger()
    if any(isinstance(h, ConsoleHandler) for h in root.handlers):
        return
    handler = ConsoleHandler()
    handler.setLevel(logging.DEBUG if verbose else logging.INFO)
    handler.addFilter(_ConsoleFilter())
    root.addHandler(handler)
    root.setLevel(logging.INFO)


class ConsoleHandler(logging.Handler):
    """One log record = one line on stderr: `LEVEL    message`, never wrapped (a row warning stays one
    line at any width), the message as plain text (user data quoted in it is never rich markup or
    `:emoji:` codes)."""

    STYLES = {"DEBUG": "dim", "INFO": "blue", "WARNING": "yellow", "ERROR": "red", "CRITICAL": "bold red"}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            line = Text.assemble((f"{record.levelname:<8} ", self.STYLES.get(record.levelname, "")), message)
            err_console.print(line, soft_wrap=True, emoji=False, markup=False, highlight=False)
        except Exception:  # noqa: BLE001 - logging's own convention: a broken handler must not break the caller
            self.handleError(record)


class _ConsoleFilter(logging.Filter):
    # Our own INFO lines; everybody else's WARNING and above (their INFO goes to run.log only).
    # A stage's "failed:" record is not shown: the CLI's top-level handler prints that error as its
    # one `error:` line (run.log keeps the record).
    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "ftpipe.core.stage" and record.msg == "%s: failed: %s":
            return False
        return record.name.startswith("ftpipe") or record.levelno >= logging.WARNING


def load(config: Path, sets: list[str] | None, flags: dict[str, Any] | None = None):
    """Load the config with overrides (see ftpipe.core.config.load_config)."""
    from ftpipe.config import load_config

    setup_logging(os.environ.get("FTPIPE_VERBOSE") == "1")
    return load_config(config, sets or [], flags=flags)


def runs_here(env_name: str, loaded) -> bool:
    """True when this process already runs in the environment `env_name` (venv or service)."""
    from ftpipe.core.executor import environment, in_environment

    if loaded.config.runtime.mode == "compose":
        return bool(os.environ.get("FTPIPE_SERVICE"))
    return in_environment(loaded.root, environment(env_name))


def delegate(env_name: str, loaded) -> None:
    """Re-run this very command in the environment `env_name` when we are not in it.

    Exits with the child's exit code when it delegated; returns when the command should run here.
    """
    from ftpipe.core.executor import run_in_environment

    if runs_here(env_name, loaded):
        return
    code = run_in_environment(
        loaded.root, env_name, sys.argv[1:], runtime=loaded.config.runtime.mode,
        compose_file=loaded.config.runtime.compose_file,
    )
    raise typer.Exit(code)


def show_result(result, title: str) -> None:
    """Print a stage result: its summary line and a metrics table."""
    style = "yellow" if result.skipped else "green"
    console.print(f"[{style}]{result.summary or title}[/{style}]")
    if result.metrics:
        table = Table(title=title, show_header=True, header_style="bold")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key, value in result.metrics.items():
            if isinstance(value, (dict, list)):
                continue
            table.add_row(str(key), f"{value:.4g}" if isinstance(value, float) else str(value))
        console.print(table)
