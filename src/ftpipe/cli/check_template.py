"""Command `check-template`: does every consumer build the same prompt as training?

    ftpipe check-template --model outputs/my-run/merged
    ftpipe check-template --model models/tiny-qwen2.5 --json

The library (`ftpipe.export.template_check`) renders a fixed set of conversations the way
training, vLLM, GGUF/llama.cpp and Ollama do; this command prints the comparison.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ftpipe.cli.common import console


def register(app: typer.Typer) -> None:
    app.command("check-template")(check_template)


def check_template(
    model: Annotated[Path, typer.Option("--model", help="A model folder with tokenizer files and a chat template.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the comparison as JSON instead of a table.")] = False,
) -> None:
    """Render no-system, system, multi-turn and (when the template has tools) tool conversations as
    training, vLLM, GGUF/llama.cpp and Ollama would, and show where they differ from training.

    Exit 0 when every consumer agrees, 1 when some differ, 2 for bad input (no folder, no chat template).
    """
    from rich.markup import escape
    from rich.table import Table

    from ftpipe.cli.common import setup_logging
    from ftpipe.export.template_check import check

    setup_logging()
    result = check(model)
    if as_json:
        console.print_json(json.dumps(result))
    else:
        table = Table(title=f"{model}: Ollama family {result['family'] or '-'}; tokenizer adds BOS: {result['adds_bos']}")
        for column in ("conversation", "consumer", "status", "tokens", "detail"):
            table.add_column(column, overflow="fold")
        colours = {"differs": "red", "refused": "yellow", "same": "green", "reference": "cyan"}
        for row in result["rows"]:
            status = f"[{colours.get(row['status'], 'white')}]{row['status']}[/]"
            table.add_row(row["conversation"], row["consumer"], status, str(row["tokens"]), escape(row["detail"]))
        console.print(table)
        if result["family_error"]:
            console.print(f"[red]Ollama: {escape(result['family_error'])}[/red]")
        console.print("[green]all consumers agree[/green]" if result["agree"] else "[red]some consumers differ[/red]")
    raise typer.Exit(0 if result["agree"] else 1)
