"""Commands `make-tiny-model` and `print-runtime`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from ftpipe.cli.common import DEFAULT_CONFIG, ConfigOpt, RunOpt, SetOpt, console, delegate, load


def register(app: typer.Typer) -> None:
    app.command("make-tiny-model")(make_tiny_model)
    app.command("print-runtime")(print_runtime)


def make_tiny_model(
    out: Annotated[Path, typer.Option("--out", help="Folder to write the model into.")],
    arch: Annotated[str, typer.Option(help="llama or qwen2.")] = "llama",
    hidden_size: Annotated[int, typer.Option(help="Hidden size (multiple of 128).")] = 128,
    intermediate_size: Annotated[int, typer.Option(help="MLP size (multiple of 128).")] = 256,
    num_layers: Annotated[int, typer.Option(help="Decoder layers.")] = 4,
    vocab_size: Annotated[int, typer.Option(help="Target BPE vocabulary size.")] = 4096,
    tie_embeddings: Annotated[bool, typer.Option("--tie-embeddings/--untied", help="Tie lm_head to the embeddings.")] = True,
    text: Annotated[Optional[list[Path]], typer.Option("--text", help="Extra text files for the tokenizer.")] = None,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
) -> None:
    """Build a tiny local model + tokenizer + chat template (no hub download)."""
    from ftpipe.cli.common import setup_logging
    from ftpipe.core.errors import ConfigError
    from ftpipe.training.config import TinyModelConfig
    from ftpipe.training.tiny_model import build
    from pydantic import ValidationError

    setup_logging()
    try:
        cfg = TinyModelConfig(
            arch=arch, hidden_size=hidden_size, intermediate_size=intermediate_size,
            num_layers=num_layers, vocab_size=vocab_size, tie_word_embeddings=tie_embeddings, seed=seed,
        )
    except ValidationError as exc:
        raise ConfigError("; ".join(f"--{'-'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from None
    info = build(out, cfg, text or [])
    console.print(f"[green]tiny {info['arch']} model[/green] -> {out} ({info['parameters']:,} parameters, vocab {info['vocab_size']})")


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

    loaded = load(config, sets)
    project = Project.from_config(loaded)
    try:
        run_dir = open_run(project, run)
    except InputError:
        if run is not None:
            raise
        run_dir = None
    report = runtime_report(loaded, run_dir)
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
