"""Commands `export-merged`, `export-gguf` and `ollama-load`.

    ftpipe export-merged --config debug_config.yaml --run my-run
    ftpipe export-gguf   --config debug_config.yaml --run my-run     # runs in .venv-gguf
    ftpipe ollama-load   --config debug_config.yaml --run my-run --set ollama.host=http://127.0.0.1:11434
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

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
    app.command("export-merged")(export_merged)
    app.command("export-gguf")(export_gguf)
    app.command("ollama-load")(ollama_load)


def export_merged(
    config: ConfigOpt = DEFAULT_CONFIG,
    sets: SetOpt = None,
    run: RunOpt = None,
    runtime: RuntimeOpt = None,
    force: ForceOpt = False,
) -> None:
    """Merge outputs/<run>/adapter into its base -> outputs/<run>/merged, verified by logits."""
    from ftpipe.export.merge import stage

    loaded = load(config, sets, flags={"runtime.mode": runtime})
    delegate("export-merged", loaded)
    result = stage(loaded, run, force)
    show_result(result, "export-merged")


def export_gguf(
    config: ConfigOpt = DEFAULT_CONFIG,
    sets: SetOpt = None,
    run: RunOpt = None,
    runtime: RuntimeOpt = None,
    force: ForceOpt = False,
    source: Annotated[
        Optional[Path],
        typer.Option("--from", help="Convert this HF model folder instead of outputs/<run>/merged."),
    ] = None,
) -> None:
    """Convert outputs/<run>/merged to GGUF (f16, q8_0, q4_k_m), verified in llama.cpp."""
    from ftpipe.export.gguf import preflight, stage

    loaded = load(config, sets, flags={"runtime.mode": runtime})
    # Before delegating: an adapter-only or missing input is one line from the host CLI.
    preflight(loaded, run, source)
    delegate("export-gguf", loaded)
    result = stage(loaded, run, force, source=source)
    show_result(result, "export-gguf")


def ollama_load(
    config: ConfigOpt = DEFAULT_CONFIG,
    sets: SetOpt = None,
    run: RunOpt = None,
    runtime: RuntimeOpt = None,
) -> None:
    """Create an Ollama model from outputs/<run>/gguf with an explicit template and stops, then chat once."""
    from ftpipe.export.ollama import stage

    loaded = load(config, sets, flags={"runtime.mode": runtime})
    delegate("ollama-load", loaded)
    result = stage(loaded, run)
    show_result(result, "ollama-load")
