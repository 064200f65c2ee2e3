"""Command `tensorboard`: serve the TensorBoard logs of one run or of all runs.

    ftpipe tensorboard --config debug_config.yaml --run demo            # http://127.0.0.1:6006/
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ftpipe.cli.common import DEFAULT_CONFIG, ConfigOpt, SetOpt, delegate, load


def register(app: typer.Typer) -> None:
    app.command("tensorboard")(tensorboard)


def tensorboard(
    config: ConfigOpt = DEFAULT_CONFIG,
    sets: SetOpt = None,
    run: Annotated[Optional[str], typer.Option("--run", help="Run to show (default: the latest run).")] = None,
    all_runs: Annotated[bool, typer.Option("--all", help="Show every run with TensorBoard events.")] = False,
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 6006,
    host: Annotated[str, typer.Option("--host", help="Address to bind (default loopback only).")] = "127.0.0.1",
) -> None:
    """Serve the TensorBoard logs of one run (--run) or all runs (--all) until Ctrl-C."""
    from ftpipe.core.errors import ConfigError
    from ftpipe.core.runs import Project
    from ftpipe.training.tensorboard import serve

    if run and all_runs:
        raise ConfigError("--run and --all exclude each other", hint="ftpipe tensorboard --all")
    loaded = load(config, sets)
    delegate("train", loaded)  # TensorBoard is installed in the train environment
    code = serve(Project.from_config(loaded), run, all_runs, host=host, port=port)
    raise typer.Exit(code)
