"""The `ftpipe` command: one Typer app, one module per command group.

    ftpipe --help
    ftpipe make-tiny-model --out models/tiny
    ftpipe print-runtime --config debug_config.yaml --format json

Every command parses its options, loads the config, calls one stage function and prints the
result. Known errors become one red line with the next command to run: exit 2 for bad input or
config, exit 1 for a failed stage. `FTPIPE_DEBUG=1` shows the traceback instead.
"""

from __future__ import annotations

import os
import sys

import typer

from ftpipe.cli import awq, evaluate, export, finetune, pipeline, preprocess, serve, tools
from ftpipe.cli import runs as runs_cli

app = typer.Typer(
    name="ftpipe",
    help="Local, Docker-first LoRA fine-tuning: data -> LoRA -> merged -> AWQ -> eval -> served.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

# One module per command group, in pipeline order (each module's `register` adds its commands).
for _module in (preprocess, finetune, export, awq, evaluate, serve, pipeline, tools):
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

        # escape(): the message quotes user data ('[admin]' roles...), never rich markup.
        err_console.print(f"[bold red]error:[/bold red] {escape(exc.one_line())}", soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
