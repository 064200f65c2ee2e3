"""How the CLI shows a stage while it runs and when it is done: progress bars and result tables.

Chosen per stage by its row of the stage table (`Stage.progress`, `Stage.display`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from rich.markup import escape
from rich.table import Table

from ftpipe.cli.common import console, err_console, show_result


class TrainProgress:
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


@contextlib.contextmanager
def read_progress() -> Iterator[Any]:
    """A transient bytes-read bar (terminal only), as a callable(done, total)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn("reading"), BarColumn(), DownloadColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=err_console, transient=True, disable=not err_console.is_terminal,
                  redirect_stdout=False, redirect_stderr=False) as bar:
        task = bar.add_task("read", total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def progress(kind: str | None):
    """The progress context of a stage: yields the callable handed to it as `progress`, or None."""
    if kind == "train":
        return TrainProgress()
    if kind == "read":
        return read_progress()
    return contextlib.nullcontext()


def show(display: str, result, title: str) -> None:
    """Print a stage's result the way its row asks for."""
    if display == "artifacts":
        console.print(f"[{'yellow' if result.skipped else 'green'}]{result.summary}[/]")
        comparison_table(result.metrics.get("artifacts") or {}, result.metrics.get("preference"))
    else:
        show_result(result, title)


def comparison_table(artifacts: dict, preference: dict | None = None) -> None:
    """Print eval-sft's artifacts side by side: status, perplexity, checks, preference accuracy, time,
    environment or reason; without preference pairs that column is "-" and the reason is printed below."""
    table = Table(title="eval-sft: artifacts side by side", header_style="bold")
    for col, justify in (("artifact", "left"), ("status", "left"), ("perplexity", "right"),
                         ("checks", "right"), ("pref. acc (margin)", "right"), ("seconds", "right"),
                         ("env / note", "left")):
        table.add_column(col, justify=justify)
    for name, a in artifacts.items():
        status = a.get("status", "?")
        style = {"ok": "green", "failed": "red"}.get(status, "yellow")
        ppl = a.get("perplexity")
        checks = f"{a['checks_passed']}/{a['checks_total']}" if a.get("checks_total") else "-"
        seconds = a.get("seconds")
        note = a.get("reason") or a.get("error") or a.get("environment") or ""
        acc, margin = a.get("preference_accuracy"), a.get("preference_margin")
        pref = f"{acc:.0%} ({margin:+.3g})" if isinstance(acc, (int, float)) and isinstance(margin, (int, float)) else "-"
        table.add_row(
            escape(name), f"[{style}]{escape(status)}[/{style}]", f"{ppl:.4g}" if isinstance(ppl, (int, float)) else "-",
            checks, pref, f"{seconds:.1f}" if isinstance(seconds, (int, float)) else "-", escape(note),
        )
    console.print(table)
    if preference and preference.get("reason"):
        console.print(f"preference accuracy: - ({escape(preference['reason'])})")
    elif preference and preference.get("pairs"):
        console.print(f"preference accuracy: {preference['pairs']} held-out pairs of {escape(str(preference.get('val_file')))}")
