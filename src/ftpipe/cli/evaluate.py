"""Commands `eval-sft` (base / adapter / merged / awq side by side) and `report` (one HTML page).

    ftpipe eval-sft --config debug_config.yaml --run my-run
    ftpipe report --config debug_config.yaml --run my-run
"""

from __future__ import annotations

import typer
from rich.markup import escape
from rich.table import Table

from ftpipe.cli.common import (
    DEFAULT_CONFIG,
    ConfigOpt,
    ForceOpt,
    RunOpt,
    RuntimeOpt,
    SetOpt,
    console,
    delegate,
    load,
    show_result,
)


def register(app: typer.Typer) -> None:
    app.command("eval-sft")(eval_sft)
    app.command("report")(report)


def eval_sft(
    config: ConfigOpt = DEFAULT_CONFIG,
    sets: SetOpt = None,
    run: RunOpt = None,
    runtime: RuntimeOpt = None,
    force: ForceOpt = False,
) -> None:
    """Perplexity (val, assistant tokens), prompt checks and samples for each artifact of a run."""
    loaded = load(config, sets, flags={"runtime.mode": runtime})
    delegate("eval-sft", loaded)
    from ftpipe.eval.evaluate import stage

    result = stage(loaded, run, force)
    console.print(f"[{'yellow' if result.skipped else 'green'}]{result.summary}[/]")
    comparison_table(result.metrics.get("artifacts") or {})


def comparison_table(artifacts: dict) -> None:
    """Print the artifacts side by side: status, perplexity, checks, time, environment or reason."""
    table = Table(title="eval-sft: artifacts side by side", header_style="bold")
    for col, justify in (("artifact", "left"), ("status", "left"), ("perplexity", "right"),
                         ("checks", "right"), ("seconds", "right"), ("env / note", "left")):
        table.add_column(col, justify=justify)
    for name, a in artifacts.items():
        status = a.get("status", "?")
        style = {"ok": "green", "failed": "red"}.get(status, "yellow")
        ppl = a.get("perplexity")
        checks = f"{a['checks_passed']}/{a['checks_total']}" if a.get("checks_total") else "-"
        seconds = a.get("seconds")
        note = a.get("reason") or a.get("error") or a.get("environment") or ""
        table.add_row(
            escape(name), f"[{style}]{escape(status)}[/{style}]", f"{ppl:.4g}" if isinstance(ppl, (int, float)) else "-",
            checks, f"{seconds:.1f}" if isinstance(seconds, (int, float)) else "-", escape(note),
        )
    console.print(table)


def report(
    config: ConfigOpt = DEFAULT_CONFIG,
    sets: SetOpt = None,
    run: RunOpt = None,
    runtime: RuntimeOpt = None,
    force: ForceOpt = False,
) -> None:
    """One self-contained HTML page for a run: data, training curves, eval comparison, manifests."""
    loaded = load(config, sets, flags={"runtime.mode": runtime})
    delegate("report", loaded)
    from ftpipe.eval.report import stage

    result = stage(loaded, run, force)
    show_result(result, "report")
