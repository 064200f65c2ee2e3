"""Commands `finetune-sft` and `tensorboard`.

    ftpipe finetune-sft --config debug_config.yaml                      # a new run
    ftpipe finetune-sft --config debug_config.yaml --run demo --resume-from latest
    ftpipe finetune-sft --config debug_config.yaml --num-processes 2    # DDP (torchrun on CPU)
    ftpipe tensorboard --config debug_config.yaml --run demo            # http://127.0.0.1:6006/
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ftpipe.cli.common import (
    DEFAULT_CONFIG,
    ConfigOpt,
    ForceOpt,
    RuntimeOpt,
    SetOpt,
    console,
    delegate,
    load,
    show_result,
)

NewRunOpt = Annotated[
    Optional[str],
    typer.Option("--run", help="Run name: reuse (resume, or skip when up to date) instead of a new run-<model>-<data>-<n>."),
]


def register(app: typer.Typer) -> None:
    app.command("finetune-sft")(finetune_sft)
    app.command("tensorboard")(tensorboard)


def finetune_sft(
    config: ConfigOpt = DEFAULT_CONFIG,
    sets: SetOpt = None,
    run: NewRunOpt = None,
    runtime: RuntimeOpt = None,
    force: ForceOpt = False,
    resume_from: Annotated[
        Optional[str],
        typer.Option("--resume-from", help="latest | auto | <checkpoint folder>: continue from a complete checkpoint."),
    ] = None,
    num_processes: Annotated[
        Optional[int],
        typer.Option("--num-processes", min=1, help="Training processes (torchrun on CPU, accelerate launch on GPUs)."),
    ] = None,
    accelerate_config: Annotated[
        Optional[Path],
        typer.Option("--accelerate-config", help="accelerate config file (configs/accelerate/*.yaml: multi-GPU, FSDP2, ZeRO-3)."),
    ] = None,
) -> None:
    """LoRA SFT with TRL on prepared/<data.name>/ -> outputs/<run>/adapter and trainer_state/."""
    from ftpipe.training.finetune import stage

    loaded = load(config, sets, flags={
        "runtime.mode": runtime,
        "finetune.num_processes": num_processes,
        "finetune.accelerate_config": str(accelerate_config) if accelerate_config else None,
    })
    delegate("finetune-sft", loaded)
    with ProgressBar() as progress:
        result = stage(loaded, run, force, resume_from=resume_from, progress=progress)
    show_result(result, "finetune-sft")


class ProgressBar:
    """A rich progress bar fed by the training callback: step, loss, tokens/s, ETA."""

    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]train[/bold]"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} tok/s"),
            TextColumn("eta"), TimeRemainingColumn(), console=console, transient=False,
        )
        self.task = None
        self.progress.start()
        return self

    def __call__(self, event: dict) -> None:
        fields = {}
        if isinstance(event.get("loss"), float):
            fields["loss"] = f"{event['loss']:.4f}"
        if event.get("tokens_per_s"):
            fields["speed"] = f"{event['tokens_per_s']:.0f}"
        if self.task is None:
            self.task = self.progress.add_task("train", total=event.get("max_steps") or None, loss="-", speed="-")
        self.progress.update(self.task, completed=event.get("step", 0), total=event.get("max_steps") or None, **fields)

    def __exit__(self, *exc) -> None:
        self.progress.stop()


def tensorboard(
    config: ConfigOpt = DEFAULT_CONFIG,
    sets: SetOpt = None,
    run: Annotated[Optional[str], typer.Option("--run", help="Run to show (default: the latest run).")] = None,
    all_runs: Annotated[bool, typer.Option("--all", help="Show every run with TensorBoard events.")] = False,
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 6006,
    host: Annotated[str, typer.Option("--host", help="Address to bind (default loopback only).")] = "127.0.0.1",
) -> None:
    """Serve the TensorBoard logs of one run (--run) or all runs (--all) until Ctrl-C."""
    from ftpipe.core.errors import ConfigError
    from ftpipe.core.runs import Project
    from ftpipe.training.tensorboard import serve

    if run and all_runs:
        raise ConfigError("--run and --all exclude each other", hint="ftpipe tensorboard --all")
    loaded = load(config, sets)
    delegate("tensorboard", loaded)
    code = serve(Project.from_config(loaded), run, all_runs, host=host, port=port)
    raise typer.Exit(code)
