"""The `ftpipe` command: one Typer app; a command per row of the stage table, plus the tools.

    ftpipe --help
    ftpipe make-tiny-model --out models/tiny
    ftpipe print-runtime --config debug_config.yaml --format json

Every stage command is built from its row of `ftpipe/stages.py` by `ftpipe/cli/stage_command.py`
(parse -> load config -> pre-flight -> run in the stage's environment -> print the result).
Known errors become one red line with the next command to run: exit 2 for bad input or config,
exit 1 for a failed stage. `FTPIPE_DEBUG=1` shows the traceback instead.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer

from ftpipe.cli import check_template, make_tiny_model, print_runtime, run, stage_command, tensorboard
from ftpipe.cli import runs as runs_cli
from ftpipe.stages import STAGES

app = typer.Typer(
    name="ftpipe",
    help="Local, Docker-first LoRA fine-tuning: data -> LoRA -> merged -> AWQ -> eval -> served.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

# The stages, in pipeline order (the generic command, or the CLI module the row names), then the tools.
for _stage in STAGES:
    if _stage.cli is None:
        stage_command.register(app, _stage)
    else:
        importlib.import_module(_stage.cli).register(app)
for _module in (run, tensorboard, make_tiny_model, print_runtime, check_template):
    _module.register(app)
app.add_typer(runs_cli.app, name="runs", help="List runs and show their stages.")


def main() -> None:
    """Console-script entry point: run the app, map known errors to one line and an exit code."""
    from ftpipe.core.errors import FtpipeError

    try:
        app()
    except FtpipeError as exc:
        if os.environ.get("FTPIPE_DEBUG") == "1":
            raise
        from rich.markup import escape

        from ftpipe.cli.common import err_console

        # escape() and emoji=False: the message quotes user data ('[admin]' roles, ':x:'), never rich markup or emoji.
        err_console.print(f"[bold red]error:[/bold red] {escape(exc.one_line())}", soft_wrap=True, emoji=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
