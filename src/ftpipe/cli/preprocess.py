"""Command `preprocess-sft`: prepare a dataset for fine-tuning (prepared/<data.name>/).

    ftpipe preprocess-sft --config debug_config.yaml
    ftpipe preprocess-sft --source data/my.csv --format csv --set data.columns.instruction=question
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ftpipe.cli.common import DEFAULT_CONFIG, ConfigOpt, ForceOpt, SetOpt, delegate, err_console, load, show_result

FORMATS = "auto, alpaca, messages, sharegpt, prompt_completion, text, csv, parquet, label_studio, label_studio_api"


def register(app: typer.Typer) -> None:
    app.command("preprocess-sft")(preprocess_sft)


def preprocess_sft(
    config: ConfigOpt = DEFAULT_CONFIG,
    sets: SetOpt = None,
    force: ForceOpt = False,
    fmt: Annotated[Optional[str], typer.Option("--format", help=f"Input format: {FORMATS}.")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Fail on the first bad row instead of dropping it.")] = False,
    source: Annotated[Optional[Path], typer.Option("--source", help="Input file (overrides data.source).")] = None,
) -> None:
    """Validate, normalise to chat messages, dedupe, measure and split a dataset into prepared/<name>/."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from ftpipe.data.preprocess import stage

    flags = {
        "data.format": fmt,
        "preprocess.strict": True if strict else None,
        "data.source": str(source.resolve()) if source is not None else None,
    }
    loaded = load(config, sets, flags)
    delegate("preprocess-sft", loaded)
    columns = [TextColumn("reading"), BarColumn(), DownloadColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=err_console, transient=True, disable=not err_console.is_terminal,
                  redirect_stdout=False, redirect_stderr=False) as bar:
        task = bar.add_task("read", total=None)
        result = stage(loaded, force=force, progress=lambda done, total: bar.update(task, completed=done, total=total))
    show_result(result, "preprocess-sft")
