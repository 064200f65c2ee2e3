"""Command `print-runtime`: resolved paths, environments and their versions, devices, Docker.

    ftpipe print-runtime --config debug_config.yaml --format json
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

import typer

from ftpipe.cli.common import DEFAULT_CONFIG, ConfigOpt, RunOpt, SetOpt, console, load


def register(app: typer.Typer) -> None:
    app.command("print-runtime")(print_runtime)


def print_runtime(
    config: ConfigOpt = DEFAULT_CONFIG,
    sets: SetOpt = None,
    run: RunOpt = None,
    fmt: Annotated[Literal["json", "text"], typer.Option("--format", help="json or text.")] = "text",
) -> None:
    """Resolved paths, environments and their versions, devices, Docker availability."""
    from ftpipe.core.errors import InputError
    from ftpipe.core.runs import Project, open_run
    from ftpipe.core.runtime_info import runtime_report
    from ftpipe.stages import environments

    loaded = load(config, sets)
    project = Project.from_config(loaded)
    try:
        run_dir = open_run(project, run)
    except InputError:
        if run is not None:
            raise
        run_dir = None
    report = runtime_report(loaded, run_dir, environments())
    if fmt == "json":
        typer.echo(json.dumps(report, indent=2))
        return
    for key, value in report.items():
        if isinstance(value, dict):
            console.print(f"[bold]{key}[/bold]")
            for k, v in value.items():
                console.print(f"  {k}: {v}")
        else:
            console.print(f"[bold]{key}[/bold]: {value}")
