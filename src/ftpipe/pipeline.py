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

from ftpipe import stages as table
from ftpipe.core.errors import ConfigError, StageError
from ftpipe.core.executor import run_in_environment
from ftpipe.core.manifest import read_manifest
from ftpipe.core.runs import Project, RunDir, new_run
from ftpipe.handoff.base_model import built_from

log = logging.getLogger(__name__)

# Pipeline order: the stage table's order (but see pipeline_order). A server step (`serve`) means:
# start it detached, run the stage that checks it (`smoke-test`), stop it.
ORDER = table.PIPELINE


@dataclass
class StageOutcome:
    """What happened to one stage in a pipeline run."""

    stage: str
    status: str  # completed | skipped | failed
    seconds: float = 0.0
    manifests: list[str] = field(default_factory=list)


def pipeline_order(serve_artifact: str, eval_after_gguf: bool = False) -> list[str]:
    """The order `ftpipe run` takes: the table's, except that the server step goes before export-gguf
    when it serves another artifact than the GGUF, and eval-sft goes right after export-gguf when it
    evaluates GGUF files (`eval_after_gguf`: a gguf_* artifact in eval.artifacts).

    Nothing in that step waits for the GGUF, whose environment (llama.cpp, compiled on first use) is
    the last one a first run gets, so serving and checking the merged model overlaps that build
    instead of waiting behind it (docs/setup.md: the first run). eval-sft otherwise comes before
    export-gguf, so a run that does not evaluate the GGUF has its evaluation before that build.
    """
    order = list(ORDER)
    if eval_after_gguf and "eval-sft" in order and "export-gguf" in order:
        order.remove("eval-sft")
        order.insert(order.index("export-gguf") + 1, "eval-sft")
    if serve_artifact == "gguf" or "serve" not in order or "export-gguf" not in order:
        return order
    order.remove("serve")
    order.insert(order.index("export-gguf"), "serve")
    return order


def select_stages(stages: list[str], start: str | None, stop: str | None, order: list[str] = ORDER) -> list[str]:
    """The configured stages in pipeline `order`, cut to [start, stop].

    Raises:
        ConfigError: unknown stage names, or --from/--to not among the stages.
    """
    unknown = [s for s in stages if s not in order]
    if unknown:
        raise ConfigError(f"run.stages: unknown stage(s) {', '.join(unknown)}; known: {', '.join(order)}")
    chosen = [s for s in order if s in stages]
    for flag, name in (("--from", start), ("--to", stop)):
        if name is not None and name not in chosen:
            raise ConfigError(f"{flag} {name}: not one of the run's stages ({', '.join(chosen)})")
    lo = chosen.index(start) if start else 0
    hi = chosen.index(stop) + 1 if stop else len(chosen)
    return chosen[lo:hi]


def open_pipeline_run(loaded, run_name: str | None, start: str | None, stop: str | None) -> tuple[RunDir, list[str]]:
    """The run folder and the stages `ftpipe run` will execute (checked before the folder is made).

    Raises:
        ConfigError: bad stage names; InputError: --runtime compose without its stack file or a Docker engine.
    """
    cfg = loaded.config
    # eval-sft's GGUF artifacts (gguf_f16, gguf_q8_0, gguf_q4_k_m) are export-gguf's files.
    eval_after_gguf = any(a.startswith("gguf_") for a in cfg.eval.artifacts)
    stages = select_stages(cfg.run.stages, start, stop, pipeline_order(cfg.serve.artifact, eval_after_gguf))
    project = Project.from_config(loaded)
    if cfg.runtime.mode == "compose":  # refuse before a run folder and latest.txt are written
        from ftpipe.core.executor import require_compose

        require_compose(project.root, cfg.runtime.compose_file)
    run = new_run(project, run_name or cfg.run.name,
                  model=cfg.model.id or cfg.model.path or "model", data=cfg.data.name)
    return run, stages


def _manifest_paths(project: Project, run: RunDir, stage: table.Stage, config) -> list[Path]:
    if stage.scope == "project":
        return [table.project_log_dir(stage, config, project) / "manifest.json"]
    return [run.manifest_path(stage.checked_by or stage.name)]


def _steps(stage: table.Stage, common: list[str], run: RunDir, force: bool, config) -> list[tuple[str, list[str]]]:
    """(environment, argv) of each `ftpipe` command a pipeline stage runs, from the table rows.

    `--force` goes only to commands that take it; a server step is start, check, stop.
    """
    def argv(row: table.Stage, *head: str) -> list[str]:
        scoped = [] if row.scope == "project" else ["--run", run.name]
        return [row.name, *head, *common, *scoped, *(["--force"] if force and row.force else [])]

    env = table.environment_of(stage, config)
    if stage.checked_by is None:
        return [(env, argv(stage))]
    check = table.get(stage.checked_by)
    # --fallback: an artifact this machine cannot serve (AWQ without vLLM's W4A16 CPU kernel) is
    # replaced by the merged model; smoke-test checks what the server really serves.
    return [(env, argv(stage, "--detach", "--fallback")), (table.environment_of(check, config), argv(check)),
            (env, argv(stage, "stop"))]


def _stamp(paths: list[Path]) -> list[tuple]:
    out = []
    for p in paths:
        m = read_manifest(p) or {}
        out.append((m.get("status"), m.get("started_at"), m.get("finished_at")))
    return out


def _up_to_date_here(name: str, loaded, run) -> bool:
    """Whether stage `name` would skip itself, judged in this process by its own `check`.

    A new-run stage (finetune-sft) is left to itself: it opens a run. A check that refuses (one
    line, FtpipeError) means the stage runs in its environment and says why there.
    """
    if table.get(name).scope == "new-run":
        return False
    return table.is_up_to_date(name, loaded, run)


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
    if tiny is not None and built_from(project.resolve(loaded.config.model.path)) != tiny.model_dump():
        # The embedded tiny model is built on first use (no download), like any other input, and
        # again when model.tiny changes (e.g. `--set model.tiny.family=qwen2.5`).
        code = run_in_environment(project.root, "train", ["make-tiny-model", *common], runtime=runtime, compose_file=compose_file)
        if code != 0:
            raise StageError(f"building the tiny model at {loaded.config.model.path} failed (exit {code})",
                             hint=f"ftpipe make-tiny-model --config {config_path}")
    for name in stages:
        stage = table.get(name)
        if on_stage:
            on_stage(name, None)
        paths = _manifest_paths(project, run, stage, loaded.config)
        before = _stamp(paths)
        start = time.monotonic()
        # A second `ftpipe run` should not start an interpreter per stage (llm-compressor's imports
        # alone take seconds: docs/setup.md), nor a server only to repeat a passing check of the same
        # artifact, prompts and config: ask the stage's own check here first (the checking stage's,
        # for a served one).
        judge = stage.checked_by or name
        if not force and _up_to_date_here(judge, loaded, run):
            outcome = StageOutcome(name, "skipped", time.monotonic() - start, [project.rel(p) for p in paths])
            if stage.checked_by:
                log.info("%s: a %s of this artifact, prompts and config already passed; skipped (--force reruns)",
                         name, stage.checked_by)
            else:
                log.info("%s: up to date (same config and inputs); skipped - use --force to rerun", name)
            outcomes.append(outcome)
            if on_stage:
                on_stage(name, outcome)
            continue
        steps = _steps(stage, common, run, force, loaded.config)
        code = 0
        for i, (env, argv) in enumerate(steps):
            code = run_in_environment(project.root, env, argv, runtime=runtime, compose_file=compose_file)
            if code != 0:
                if stage.checked_by and i == 1:  # the check failed: still stop the server
                    run_in_environment(project.root, steps[2][0], steps[2][1], runtime=runtime, compose_file=compose_file)
                break
        seconds = time.monotonic() - start
        after = _stamp(paths)
        if code != 0:
            outcome = StageOutcome(name, "failed", seconds, [project.rel(p) for p in paths])
            if on_stage:
                on_stage(name, outcome)
            log_dir = project.rel(paths[0].parent)
            raise StageError(
                f"run {run.name}: stage {name} failed (exit {code}); see {log_dir}/run.log",
                hint=f"fix it, then ftpipe run --run {run.name} --from {name} --config {config_path}",
            )
        status = "skipped" if before == after and before[0][0] == "completed" else "completed"
        outcome = StageOutcome(name, status, seconds, [project.rel(p) for p in paths])
        outcomes.append(outcome)
        if on_stage:
            on_stage(name, outcome)
    return outcomes
