"""Commands `serve`, `serve stop` and `smoke-test`.

    ftpipe serve --config debug_config.yaml --artifact merged --detach
    ftpipe smoke-test --config debug_config.yaml
    ftpipe serve stop --config debug_config.yaml
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional

import typer

from ftpipe.cli.common import (
    DEFAULT_CONFIG, ConfigOpt, RunOpt, RuntimeOpt, SetOpt, console, delegate, load, show_result,
)

ArtifactOpt = Annotated[
    Optional[Literal["merged", "awq", "adapter", "gguf"]],
    typer.Option("--artifact", help="merged | awq | adapter (vLLM) | gguf (llama.cpp). [serve.artifact]"),
]
HostOpt = Annotated[Optional[str], typer.Option("--host", help="Bind address (default 127.0.0.1). [serve.host]")]
PortOpt = Annotated[Optional[int], typer.Option("--port", help="Port. [serve.port]")]
ApiKeyOpt = Annotated[
    Optional[str],
    typer.Option(
        "--api-key", envvar="FTPIPE_API_KEY", show_envvar=True,
        help="Bearer key clients must send; required off loopback. Prefer the FTPIPE_API_KEY variable "
        "(a flag value shows in `ps`). [serve.api_key]",
    ),
]

serve_app = typer.Typer(
    invoke_without_command=True,
    no_args_is_help=False,
    help="OpenAI-compatible server for a run's artifact (vLLM; llama.cpp for GGUF). `serve stop` stops it.",
)


def register(app: typer.Typer) -> None:
    app.add_typer(serve_app, name="serve")
    app.command("smoke-test")(smoke_test)


def _flags(artifact, host, port, api_key, runtime) -> dict:
    return {"serve.artifact": artifact, "serve.host": host, "serve.port": port, "serve.api_key": api_key, "runtime.mode": runtime}


@serve_app.callback()
def serve(
    ctx: typer.Context,
    config: ConfigOpt = DEFAULT_CONFIG,
    sets: SetOpt = None,
    run: RunOpt = None,
    runtime: RuntimeOpt = None,
    artifact: ArtifactOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    api_key: ApiKeyOpt = None,
    detach: Annotated[bool, typer.Option("--detach", help="Return once healthy; stop with `ftpipe serve stop`.")] = False,
) -> None:
    """Serve a run's artifact; the model name is the run name. Waits for /health (serve.startup_timeout)."""
    if ctx.invoked_subcommand is not None:
        return
    from ftpipe.core.errors import InputError
    from ftpipe.serve.server import serve as serve_stage

    loaded = load(config, sets, flags=_flags(artifact, host, port, api_key, runtime))
    if loaded.config.runtime.mode == "compose":
        raise InputError(
            "ftpipe serve --runtime compose: the vllm-server Compose service is the server",
            hint="FTPIPE_SERVED_MODEL=outputs/<run>/merged FTPIPE_SERVED_NAME=<run> docker compose up -d vllm-server "
            "(see docs/compose.md)",
        )
    # llama.cpp's server lives in the gguf environment, vLLM in the serve environment.
    delegate("serve-gguf" if loaded.config.serve.artifact == "gguf" else "serve", loaded)

    def ready(state) -> None:
        console.print(f"[green]serving {state.model_name!r} ({state.artifact}, {state.kind}) at {state.url}[/green] "
                      f"pid {state.pid}, log {state.log}")
        if detach:
            console.print(f"stop it with: ftpipe serve stop --run {state.run}")
        else:
            console.print("Ctrl-C stops it")

    serve_stage(loaded, run, detach=detach, on_ready=ready)
    if not detach:
        console.print("[green]server stopped[/green]")


@serve_app.command("stop")
def serve_stop(
    config: ConfigOpt = DEFAULT_CONFIG,
    sets: SetOpt = None,
    run: RunOpt = None,
) -> None:
    """Stop the server started by `ftpipe serve` for a run (reads logs/<run>/serve/server.json)."""
    from ftpipe.serve.server import stop

    state = stop(load(config, sets), run)
    note = "" if state.extra.get("clean") else " (killed after serve.stop_timeout)"
    console.print(f"[green]stopped the server of run {state.run} (pid {state.pid}, {state.url}){note}[/green]")


def smoke_test(
    config: ConfigOpt = DEFAULT_CONFIG,
    sets: SetOpt = None,
    run: RunOpt = None,
    runtime: RuntimeOpt = None,
    artifact: ArtifactOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """Chat with the served model: answers non-empty and stopping at EOS, chat template, prompt checks."""
    from ftpipe.serve.smoke import stage

    loaded = load(config, sets, flags=_flags(artifact, host, port, api_key, runtime))
    delegate("smoke-test", loaded)
    show_result(stage(loaded, run), "smoke-test")
