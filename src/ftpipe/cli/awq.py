"""Command `convert-awq`: 4-bit AWQ of the run's merged model (runs in the awq environment).

    ftpipe convert-awq --config debug_config.yaml --run my-run
"""

from __future__ import annotations

import typer

from ftpipe.cli.common import (
    DEFAULT_CONFIG,
    ConfigOpt,
    ForceOpt,
    RunOpt,
    RuntimeOpt,
    SetOpt,
    delegate,
    load,
    show_result,
)


def register(app: typer.Typer) -> None:
    app.command("convert-awq")(convert_awq)


def convert_awq(
    config: ConfigOpt = DEFAULT_CONFIG,
    sets: SetOpt = None,
    run: RunOpt = None,
    runtime: RuntimeOpt = None,
    force: ForceOpt = False,
) -> None:
    """Quantize outputs/<run>/merged to 4-bit AWQ (W4A16) into outputs/<run>/awq, verified."""
    from ftpipe.export.awq import preflight, stage

    loaded = load(config, sets, flags={"runtime.mode": runtime})
    # Checked here, before delegating, so a missing merged model or awq environment is one line
    # from the host CLI rather than a failure inside another venv or container.
    preflight(loaded, run)
    delegate("convert-awq", loaded)
    result = stage(loaded, run, force)
    show_result(result, "convert-awq")
