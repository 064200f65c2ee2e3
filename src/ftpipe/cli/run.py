"""Commands `run` (the whole pipeline from a config) and `demo` (`run` on the embedded tiny model).

    ftpipe run --config debug_config.yaml --run my-run --from finetune-sft --to eval-sft
    ftpipe demo
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ftpipe.cli.common import DEFAULT_CONFIG, ConfigOpt, ForceOpt, RunOpt, RuntimeOpt, SetOpt, console, load

DEMO_CONFIG = Path("debug_config.yaml")
DEMO_RUN = "demo"

FromOpt = Annotated[Optional[str], typer.Option("--from", help="First stage to run.")]
ToOpt = Annotated[Optional[str], typer.Option("--to", help="Last stage to run.")]


def register(app: typer.Typer) -> None:
    app.command("run")(run)
    app.command("demo")(demo)


def run(
    config: ConfigOpt = DEFAULT_CONFIG,
    sets: SetOpt = None,
    run_name: RunOpt = None,
    runtime: RuntimeOpt = None,
    start: FromOpt = None,
    stop: ToOpt = None,
    force: ForceOpt = False,
) -> None:
    """Run the pipeline stages of the config in order, skipping those already up to date."""
    _pipeline(config, sets or [], run_name, runtime, start, stop, force, title="ftpipe run")


def demo(
    config: Annotated[Path, typer.Option("--config", "-c", help="Demo config.")] = DEMO_CONFIG,
    sets: SetOpt = None,
    run_name: Annotated[Optional[str], typer.Option("--run", help=f"Run name (default: the config's run.name, else {DEMO_RUN}).")] = None,
    start: FromOpt = None,
    stop: ToOpt = None,
    force: ForceOpt = False,
) -> None:
    """The whole pipeline on the embedded tiny model and the shipped demo data, on the CPU."""
    _pipeline(config, sets or [], run_name, "local", start, stop, force, title="ftpipe demo", default_run=DEMO_RUN)


def _pipeline(config, sets, run_name, runtime, start, stop, force, title, default_run: str | None = None) -> None:
    from ftpipe.pipeline import open_pipeline_run, run_pipeline

    loaded = load(config, sets, flags={"runtime.mode": runtime})
    run_dir, stages = open_pipeline_run(loaded, run_name or loaded.config.run.name or default_run, start, stop)
    console.print(f"[bold]{title}[/bold]: run [cyan]{run_dir.name}[/cyan], stages: {' -> '.join(stages)}")
    started = time.monotonic()

    def on_stage(stage, outcome) -> None:
        if outcome is None:
            console.print(f"[bold blue]>> {stage}[/bold blue]")
        else:
            colour = {"completed": "green", "skipped": "yellow"}.get(outcome.status, "red")
            console.print(f"[{colour}]{stage}: {outcome.status}[/{colour}] ({outcome.seconds:.1f}s)")

    outcomes = run_pipeline(loaded, config, run_dir, stages, sets, force=force, on_stage=on_stage)
    table = Table(title=f"{title}: {run_dir.name} in {time.monotonic() - started:.0f}s")
    for col in ("stage", "status", "seconds", "manifest"):
        table.add_column(col)
    for o in outcomes:
        table.add_row(o.stage, o.status, f"{o.seconds:.1f}", ", ".join(o.manifests))
    console.print(table)
    if run_dir.report.exists():
        console.print(f"report: {run_dir.project.rel(run_dir.report)}")
    console.print(f"next: ftpipe runs show {run_dir.name} --config {config}")
