"""Commands `runs list` and `runs show`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from ftpipe.cli.common import DEFAULT_CONFIG, ConfigOpt, SetOpt, console, load

app = typer.Typer(no_args_is_help=True)

KEY_METRICS = ("train_loss", "eval_loss", "perplexity", "max_abs_logit_diff", "size_ratio", "rows_kept", "seconds")


def _metrics_text(metrics: dict) -> str:
    parts = [f"{k}={metrics[k]:.4g}" if isinstance(metrics[k], float) else f"{k}={metrics[k]}" for k in KEY_METRICS if k in metrics]
    return " ".join(parts)


@app.command("list")
def list_runs(config: ConfigOpt = DEFAULT_CONFIG, sets: SetOpt = None) -> None:
    """All runs with their stages and status."""
    from ftpipe.core.runs import Project, all_runs

    project = Project.from_config(load(config, sets))
    runs = all_runs(project)
    if not runs:
        console.print("no runs yet (next: ftpipe finetune-sft or ftpipe demo)")
        return
    table = Table(title="runs")
    table.add_column("run")
    table.add_column("stages")
    for r in runs:
        stages = ", ".join(f"{s}:{v['status']}" for s, v in r["stages"].items()) or "-"
        table.add_row(r["name"] + (" (latest)" if r["latest"] else ""), stages)
    console.print(table)


@app.command("show")
def show_run(
    name: Annotated[Optional[str], typer.Argument(help="Run name (default: latest).")] = None,
    config: ConfigOpt = DEFAULT_CONFIG,
    sets: SetOpt = None,
) -> None:
    """One run: each stage's status, timing and key metrics."""
    from ftpipe.core.runs import Project, open_run, run_summary

    project = Project.from_config(load(config, sets))
    summary = run_summary(open_run(project, name))
    table = Table(title=f"run {summary['name']}")
    for col in ("stage", "status", "finished", "metrics / error"):
        table.add_column(col)
    for stage, info in summary["stages"].items():
        detail = info["error"] or _metrics_text(info["metrics"])
        table.add_row(stage, str(info["status"]), str(info["finished_at"] or "-"), detail)
    console.print(table)
