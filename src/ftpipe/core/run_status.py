"""Run summaries for `ftpipe runs list` / `runs show`: stages, status and key metrics."""

from __future__ import annotations

from typing import Any

from ftpipe.core.manifest import read_manifest
from ftpipe.core.runs import Project, RunDir


def run_summary(run: RunDir) -> dict[str, Any]:
    """One run: each stage's status, timings and metrics from its manifest."""
    stages = {}
    for stage in run.stages():
        m = read_manifest(run.manifest_path(stage)) or {"status": "unreadable"}
        stages[stage] = {
            "status": m.get("status"),
            "started_at": m.get("started_at"),
            "finished_at": m.get("finished_at"),
            "metrics": m.get("metrics", {}),
            "error": m.get("error"),
        }
    return {"name": run.name, "latest": run.project.latest_run_name() == run.name, "stages": stages}


def all_runs(project: Project) -> list[dict[str, Any]]:
    """Summaries of every run, oldest name first."""
    return [run_summary(RunDir(project, name)) for name in project.run_names()]
