"""Command `serve` (and `serve stop`): an OpenAI-compatible server for a run's artifact.

Not a generic stage command: it writes no manifest, stays in the foreground until Ctrl-C (or
returns once healthy with --detach) and has a `stop` subcommand. Its options come from the
`serve` row of the stage table, like every stage command's.

    ftpipe serve --config debug_config.yaml --artifact merged --detach
    ftpipe serve stop --config debug_config.yaml
"""

from __future__ import annotations

import inspect
from typing import Any

import typer

from ftpipe.cli.common import DEFAULT_CONFIG, ConfigOpt, RunOpt, SetOpt, console, delegate, load
from ftpipe.cli.stage_command import build, common_params, option_param, split_options
from ftpipe.stages import get

STAGE = get("serve")

serve_app = typer.Typer(invoke_without_command=True, no_args_is_help=False, help=STAGE.help)


def register(app: typer.Typer) -> None:
    app.add_typer(serve_app, name="serve")


def _serve(ctx: typer.Context, **values: Any) -> None:
    if ctx.invoked_subcommand is not None:
        return
    from ftpipe.core.errors import InputError
    from ftpipe.serve.serve import serve
    from ftpipe.stages import environment_of, prepare

    flags, options = split_options(STAGE, values)
    loaded = load(values["config"], values["sets"], flags={"runtime.mode": values["runtime"], **flags})
    if loaded.config.runtime.mode == "compose":
        raise InputError(
            "ftpipe serve --runtime compose: the vllm-server Compose service is the server",
            hint="FTPIPE_SERVED_MODEL=outputs/<run>/merged FTPIPE_SERVED_NAME=<run> docker compose up -d vllm-server "
            "(see docs/compose.md)",
        )
    delegate(environment_of(STAGE, loaded.config), loaded)
    detach = bool(options["detach"])

    def ready(state) -> None:
        console.print(f"[green]serving {state.model_name!r} ({state.artifact}, {state.kind}) at {state.url}[/green] "
                      f"pid {state.pid}, log {state.log}")
        if "substitution" in state.extra:
            console.print(f"[yellow]served {state.artifact} instead of {state.extra['requested_artifact']}: "
                          f"{state.extra['substitution']}[/yellow]")
        console.print(f"stop it with: ftpipe serve stop --run {state.run}" if detach else "Ctrl-C stops it")

    stage_ctx, _ = prepare(STAGE, loaded, values["run"], **options)  # opens the run, runs serve's check
    serve(stage_ctx, on_ready=ready)
    if not detach:
        console.print("[green]server stopped[/green]")


_CONTEXT = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
serve_app.callback()(build(
    "serve", [_CONTEXT, *common_params(STAGE), *(option_param(o) for o in STAGE.options)], _serve,
    "Serve a run's artifact; the model name is the run name. Waits for /health (serve.startup_timeout).",
))


@serve_app.command("stop")
def serve_stop(
    config: ConfigOpt = DEFAULT_CONFIG,
    sets: SetOpt = None,
    run: RunOpt = None,
) -> None:
    """Stop the server started by `ftpipe serve` for a run (reads logs/<run>/serve/server.json)."""
    from ftpipe.serve.serve import stop

    state = stop(load(config, sets), run)
    note = "" if state.extra.get("clean") else " (killed after serve.stop_timeout)"
    console.print(f"[green]stopped the server of run {state.run} (pid {state.pid}, {state.url}){note}[/green]")
