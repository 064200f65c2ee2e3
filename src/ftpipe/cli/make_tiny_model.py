"""Command `make-tiny-model`: a tiny local model + tokenizer + chat template (no hub download).

    ftpipe make-tiny-model --out models/tiny
    ftpipe make-tiny-model --config debug_config.yaml
    ftpipe make-tiny-model --family qwen2.5 --out models/tiny-qwen2.5
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ftpipe.cli.common import ForceOpt, SetOpt, console, load


def register(app: typer.Typer) -> None:
    app.command("make-tiny-model")(make_tiny_model)


def make_tiny_model(
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder to write the model into (default: model.path of --config).")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="Take model.tiny and model.path from this config.")] = None,
    sets: SetOpt = None,
    arch: Annotated[str, typer.Option(help="llama or qwen2 (with a locally trained tokenizer).")] = "llama",
    family: Annotated[Optional[str], typer.Option(help="A model family with its real tokenizer and chat template: llama3, qwen2.5, qwen3, phi3.5, mistral, gemma.")] = None,
    hidden_size: Annotated[int, typer.Option(help="Hidden size (multiple of 128).")] = 128,
    intermediate_size: Annotated[int, typer.Option(help="MLP size (multiple of 128).")] = 256,
    num_layers: Annotated[int, typer.Option(help="Decoder layers.")] = 4,
    vocab_size: Annotated[int, typer.Option(help="Target BPE vocabulary size.")] = 4096,
    tie_embeddings: Annotated[bool, typer.Option("--tie-embeddings/--untied", help="Tie lm_head to the embeddings.")] = True,
    text: Annotated[Optional[list[Path]], typer.Option("--text", help="Extra text files for the tokenizer.")] = None,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    force: ForceOpt = False,
) -> None:
    """Build a tiny local model + tokenizer + chat template (no hub download).

    With --config, the `model.tiny` section gives the shape, `model.path` the folder and the
    dataset (`data.source`) is added to the tokenizer text; a model built from the same settings is
    kept (rebuilt when `model.tiny` changed). With --out, an existing model is kept unless --force.
    """
    from pydantic import ValidationError

    from ftpipe.cli.common import setup_logging
    from ftpipe.core.errors import ConfigError
    from ftpipe.core.config import TinyModelConfig
    from ftpipe.handoff.base_model import built_from
    from ftpipe.training.tiny_model import build

    setup_logging()
    texts = list(text or [])
    root = Path.cwd()
    if config is not None:
        loaded = load(config, sets)
        cfg_model = loaded.config.model
        if cfg_model.tiny is None:
            raise ConfigError(f"{config}: model.tiny is not set: nothing to build", hint="ftpipe make-tiny-model --out DIR")
        cfg = cfg_model.tiny
        root = loaded.root
        if family:
            cfg = cfg.model_copy(update={"family": family})
        out = out or loaded.root / cfg_model.path
        if loaded.config.data.source:
            source = loaded.root / loaded.config.data.source
            if source.is_file():
                texts.append(source)
    else:
        if out is None:
            raise ConfigError("make-tiny-model needs --out DIR or --config FILE", hint="ftpipe make-tiny-model --out models/tiny")
        try:
            cfg = TinyModelConfig(
                arch=arch, hidden_size=hidden_size, intermediate_size=intermediate_size,
                num_layers=num_layers, vocab_size=vocab_size, tie_word_embeddings=tie_embeddings, seed=seed,
                family=family,
            )
        except ValidationError as exc:
            raise ConfigError("; ".join(f"--{'-'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from None
    exists = (Path(out) / "config.json").is_file()
    if exists and not force and (config is None or built_from(out) == cfg.model_dump()):
        console.print(f"[yellow]{out} already holds a model; kept (use --force to rebuild)[/yellow]")
        return
    if exists and not force:
        console.print(f"[yellow]{out} was built from other model.tiny settings: rebuilding[/yellow]")
    info = build(out, cfg, texts, root=root)
    kind = f"{info['family']} ({info['arch']})" if info.get("family") else info["arch"]
    console.print(f"[green]tiny {kind} model[/green] -> {out} ({info['parameters']:,} parameters, vocab {info['vocab_size']})")
