"""`ftpipe run` / `ftpipe demo`: every stage of the config, in order, each in its environment.

Each stage runs as its own `ftpipe <stage>` process through the executor (the stage's venv, or
its Compose service), exactly as a user would run it by hand; each one skips itself when its
manifest is up to date, so a second run of an unchanged config does no work, and a changed
training value reruns training and everything after it, nothing before. A failed stage stops
the run with its error and the command that continues it.

    ftpipe run --config debug_config.yaml --run my-run --from finetune-sft --to eval-sft
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ftpipe.core.errors import ConfigError, StageError
from ftpipe.core.executor import run_in_environment
from ftpipe.core.manifest import read_manifest
from ftpipe.core.runs import Project, RunDir

log = logging.getLogger(__name__)

# Pipeline order. `serve` in a pipeline means: start detached, `smoke-test`, stop.
ORDER = [
    "preprocess-sft",
    "finetune-sft",
    "export-merged",
    "convert-awq",
    "eval-sft",
    "export-gguf",
    "serve",
    "report",
]
NOT_RUN_SCOPED = {"preprocess-sft"}


@dataclass
class StageOutcome:
    """What happened to one stage in a pipeline run."""

    stage: str
    status: str  # completed | skipped | failed
    seconds: float = 0.0
    manifests: list[str] = field(default_factory=list)


def select_stages(stages: list[str], start: str | None, stop: str | None) -> list[str]:
    """The configured stages in pipeline order, cut to [start, stop].

    Raises:
        ConfigError: unknown stage names, or --from/--to not among the stages.
    """
    unknown = [s for s in stages if s not in ORDER]
    if unknown:
        raise ConfigError(f"run.stages: unknown stage(s) {', '.join(unknown)}; known: {', '.join(ORDER)}")
    chosen = [s for s in ORDER if s in stages]
    for flag, name in (("--from", start), ("--to", stop)):
        if name is not None and name not in chosen:
            raise ConfigError(f"{flag} {name}: not one of the run's stages ({', '.join(chosen)})")
    lo = chosen.index(start) if start else 0
    hi = chosen.index(stop) + 1 if stop else len(chosen)
    return chosen[lo:hi]


def _manifest_paths(project: Project, run: RunDir, stage: str, dataset: str) -> list[Path]:
    if stage == "preprocess-sft":
        return [project.prepared_log_dir(dataset) / "manifest.json"]
    if stage == "serve":
        return [run.manifest_path("smoke-test")]
    return [run.manifest_path(stage)]


def _stamp(paths: list[Path]) -> list[tuple]:
    out = []
    for p in paths:
        m = read_manifest(p) or {}
        out.append((m.get("status"), m.get("started_at"), m.get("finished_at")))
    return out


def _smoke_test_current(loaded, run: RunDir) -> bool:
    # Starting a server only to repeat a passing smoke test of the same artifact is the one
    # expensive no-op a second `ftpipe run` would do; the smoke stage knows its own inputs.
    from ftpipe.core.errors import FtpipeError
    from ftpipe.serve.smoke import passed_for_current_inputs

    try:
        return passed_for_current_inputs(loaded, run.name)
    except FtpipeError:
        return False  # not servable yet: let `serve` say why


def run_pipeline(
    loaded,
    config_path: Path,
    run: RunDir,
    stages: list[str],
    sets: list[str],
    force: bool = False,
    on_stage: Callable[[str, StageOutcome | None], None] | None = None,
) -> list[StageOutcome]:
    """Run `stages` for `run`, each as `ftpipe <stage>` in its environment.

    Args:
        on_stage: called with (stage, None) before and (stage, outcome) after each stage.

    Returns:
        One outcome per stage.

    Raises:
        StageError: the first failing stage, naming its log and the command that continues.
    """
    import time

    project = run.project
    runtime = loaded.config.runtime.mode
    compose_file = loaded.config.runtime.compose_file
    common = ["--config", str(config_path)]
    for item in sets:
        common += ["--set", item]
    outcomes = []
    tiny = loaded.config.model.tiny
    if tiny is not None and not (project.resolve(loaded.config.model.path) / "config.json").is_file():
        # The embedded tiny model is built on first use (no download), like any other input.
        code = run_in_environment(project.root, "make-tiny-model", ["make-tiny-model", *common], runtime=runtime, compose_file=compose_file)
        if code != 0:
            raise StageError(f"building the tiny model at {loaded.config.model.path} failed (exit {code})",
                             hint=f"ftpipe make-tiny-model --config {config_path}")
    for stage in stages:
        if on_stage:
            on_stage(stage, None)
        paths = _manifest_paths(project, run, stage, loaded.config.data.name)
        before = _stamp(paths)
        start = time.monotonic()
        if stage == "serve" and not force and _smoke_test_current(loaded, run):
            outcome = StageOutcome(stage, "skipped", time.monotonic() - start, [project.rel(p) for p in paths])
            log.info("serve: a smoke test of this artifact, prompts and config already passed; skipped (--force reruns)")
            outcomes.append(outcome)
            if on_stage:
                on_stage(stage, outcome)
            continue
        scoped = [] if stage in NOT_RUN_SCOPED else ["--run", run.name]
        extra = ["--force"] if force else []
        if stage == "serve":
            argv_list = [
                ["serve", *common, *scoped, "--detach"],
                ["smoke-test", *common, *scoped, *extra],
                ["serve", "stop", *common, *scoped],
            ]
        else:
            argv_list = [[stage, *common, *scoped, *extra]]
        code = 0
        for i, argv in enumerate(argv_list):
            code = run_in_environment(project.root, argv[0], argv, runtime=runtime, compose_file=compose_file)
            if code != 0:
                if stage == "serve" and i == 1:  # smoke test failed: still stop the server
                    run_in_environment(project.root, "serve", argv_list[2], runtime=runtime, compose_file=compose_file)
                break
        seconds = time.monotonic() - start
        after = _stamp(paths)
        if code != 0:
            outcome = StageOutcome(stage, "failed", seconds, [project.rel(p) for p in paths])
            if on_stage:
                on_stage(stage, outcome)
            log_dir = project.rel(paths[0].parent)
            raise StageError(
                f"run {run.name}: stage {stage} failed (exit {code}); see {log_dir}/run.log",
                hint=f"fix it, then ftpipe run --run {run.name} --from {stage} --config {config_path}",
            )
        status = "skipped" if before == after and before[0][0] == "completed" else "completed"
        outcome = StageOutcome(stage, status, seconds, [project.rel(p) for p in paths])
        outcomes.append(outcome)
        if on_stage:
            on_stage(stage, outcome)
    return outcomes
