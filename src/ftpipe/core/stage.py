"""The stage contract and the lifecycle every stage goes through: skip check, logging, manifest, outputs.

A stage module (`ftpipe/stages.py` names it and calls it) exposes three plain functions:

    check(ctx) -> dict[str, Path | Remote]   # pure and cheap: validates config and inputs, returns the
                                             # inputs to hash; no network, no writes, ctx untouched
    plan(ctx) -> <Stage>Plan                 # a frozen dataclass: everything resolved before the work;
                                             # may do I/O (downloads, reading configs); runs once
    run(ctx, plan) -> StageResult            # the work

`check` is all that pre-flight (on the host, before delegating to the stage's environment) and the
pipeline's up-to-date test call, so it may run several times. `execute` wraps `plan` and `run`:

1. same config hash and same inputs as a `completed` manifest whose outputs are intact -> skip
   (an input on a server, `Remote`, is never up to date: it cannot be compared without a connection);
2. manifest `running` written, logging goes to logs/.../<stage>/run.log and console.log;
3. `plan` then `run`; the outputs are hashed; the manifest is rewritten last, atomically, as
   `completed` - or `failed` with the error, and the error re-raised.

A crash (even SIGKILL) therefore leaves `running` or the previous manifest, never `completed`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

from ftpipe.core.config import LoadedConfig
from ftpipe.core.errors import FtpipeError
from ftpipe.core.logs import stage_logging
from ftpipe.core.manifest import (
    SCHEMA_VERSION,
    Remote,
    environment_record,
    file_records,
    input_record,
    now,
    outputs_intact,
    package_versions,
    read_manifest,
    write_manifest,
)
from ftpipe.core.runs import Project, RunDir

log = logging.getLogger(__name__)


@dataclass
class StageContext:
    """Everything a stage needs: its config, its run folder, where to log, whether to force.

    `options` (the command's options that set no config key, e.g. --resume-from) is read-only: what a
    stage works out before running goes into its plan, never back into the context.
    """

    stage: str
    loaded: LoadedConfig
    project: Project
    log_dir: Path
    run: RunDir | None = None
    force: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)
    # The manifest as it was before this attempt (execute() overwrites it with `running` first):
    # how a stage tells an interrupted attempt from a finished one.
    previous_manifest: dict[str, Any] | None = None
    spec: Any = None  # the stage's row of the stage table (ftpipe/stages.py)
    upstream: tuple[str, ...] = ()  # run-scoped stages whose completed manifests this one needs
    run_name: str | None = None  # a new-run stage: the --run asked for (None: a new run-<model>-<data>-<n>)
    progress: Callable[..., None] | None = None  # the CLI's progress bar: progress(done, total)
    # What the stage table knows that a stage needs and may not import upward (ftpipe/stages.py):
    # artifact name -> the stage whose completed manifest vouches for it (adapter: finetune-sft, ...).
    producers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.options = MappingProxyType(dict(self.options))
        self.producers = MappingProxyType(dict(self.producers))

    @classmethod
    def for_run(cls, stage: str, loaded: LoadedConfig, run: RunDir, force: bool = False, **options: Any) -> "StageContext":
        """Context of a run-scoped stage: logs/<run>/<stage>/."""
        return cls(stage, loaded, run.project, run.log_dir(stage), run, force, options)

    @property
    def config(self):
        return self.loaded.config

    @property
    def manifest_path(self) -> Path:
        return self.log_dir / "manifest.json"



@dataclass
class StageResult:
    """What a stage produced: output files/folders to hash, metrics, a one-line summary."""

    outputs: list[Path] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    skipped: bool = False
    manifest: dict[str, Any] | None = None


def execute(
    ctx: StageContext,
    plan: Callable[[StageContext], Any],
    run: Callable[[StageContext, Any], StageResult],
    *,
    sections: tuple[str, ...],
    inputs: dict[str, Path | Remote],
    environment: str = "train",
) -> StageResult:
    """Run `run(ctx, plan(ctx))` under the manifest lifecycle described in the module docstring.

    Args:
        ctx: the stage context.
        plan: the stage's `plan` (runs once, only when the stage is not up to date).
        run: the stage's `run`.
        sections: config sections that affect the result (hashed; `Stage.sections`).
        inputs: what `check` returned: named input files/folders/upstream manifests (recorded and
            compared), or `Remote` inputs (recorded, never up to date).
        environment: the stage environment name recorded in the manifest.

    Returns:
        The stage's result, or the previous result with `skipped=True`.

    Raises:
        FtpipeError: re-raised from the stage after the manifest is marked `failed`.
    """
    project = ctx.project
    config_hash = ctx.loaded.section_hash(*sections)
    input_records = {name: input_record(project, path) for name, path in inputs.items()}
    ctx.previous_manifest = read_manifest(ctx.manifest_path)
    previous = None if ctx.force else _completed_match(ctx, ctx.previous_manifest, config_hash, input_records)
    if previous is not None:
        log.info("%s: up to date (same config and inputs); skipped - use --force to rerun", ctx.stage)
        return StageResult(
            outputs=[project.resolve(r["path"]) for r in previous.get("outputs", [])],
            metrics=previous.get("metrics", {}),
            summary=f"{ctx.stage}: up to date, skipped (use --force to rerun)",
            skipped=True,
            manifest=previous,
        )

    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "run": ctx.run.name if ctx.run else None,
        "stage": ctx.stage,
        "status": "running",
        "started_at": now(),
        "finished_at": None,
        "config": ctx.loaded.redacted(),
        "config_hash": config_hash,
        "config_source": project.rel(ctx.loaded.source) if ctx.loaded.source else None,
        "inputs": input_records,
        "outputs": [],
        "metrics": {},
        "versions": package_versions(),
        "environment": {**environment_record(project), "stage_environment": environment},
    }
    ctx.log_dir.mkdir(parents=True, exist_ok=True)
    write_manifest(ctx.manifest_path, manifest)
    start = time.monotonic()
    with stage_logging(ctx.log_dir):
        log.info("%s: started (config hash %s)", ctx.stage, config_hash[:12])
        try:
            result = run(ctx, plan(ctx))
        except BaseException as exc:  # noqa: BLE001 - recorded, then re-raised unchanged
            manifest.update(
                status="failed",
                finished_at=now(),
                error=exc.one_line() if isinstance(exc, FtpipeError) else f"{type(exc).__name__}: {exc}",
            )
            manifest["metrics"]["seconds"] = round(time.monotonic() - start, 3)
            write_manifest(ctx.manifest_path, manifest)
            log.error("%s: failed: %s", ctx.stage, manifest["error"])
            raise
        manifest["outputs"] = file_records(project, result.outputs)
        manifest["metrics"] = {**result.metrics, "seconds": round(time.monotonic() - start, 3)}
        manifest.update(status="completed", finished_at=now())
        write_manifest(ctx.manifest_path, manifest)
        log.info("%s: completed in %.1fs", ctx.stage, manifest["metrics"]["seconds"])
    result.manifest = manifest
    return result


def _completed_match(
    ctx: StageContext, previous: dict[str, Any] | None, config_hash: str, input_records: dict[str, Any]
) -> dict[str, Any] | None:
    """`previous` when it is `completed` for exactly this config and these inputs, with its outputs
    intact; None when the stage has to run (always, with an input on a server)."""
    remote = [name for name, record in input_records.items() if "remote" in record]
    if remote:
        log.info("%s: input %s is on a server and is read again on every run", ctx.stage, ", ".join(remote))
        return None
    if (
        previous is not None
        and previous.get("status") == "completed"
        and previous.get("config_hash") == config_hash
        and previous.get("inputs") == input_records
        and outputs_intact(ctx.project, previous)
    ):
        return previous
    return None


def up_to_date(ctx: StageContext, *, sections: tuple[str, ...], inputs: dict[str, Path | Remote]) -> bool:
    """Whether `execute` would skip this stage (same config sections, inputs, intact outputs)."""
    records = {name: input_record(ctx.project, path) for name, path in inputs.items()}
    previous = read_manifest(ctx.manifest_path)
    return _completed_match(ctx, previous, ctx.loaded.section_hash(*sections), records) is not None


def upstream_state(run: RunDir, stage: str) -> str | None:
    """None when `stage` of `run` has completed, else its state ("missing", "running", "failed")."""
    manifest = read_manifest(run.manifest_path(stage))
    if manifest is None:
        return "missing"
    return None if manifest.get("status") == "completed" else str(manifest.get("status"))


def require_completed(run: RunDir, stage: str, command: str) -> dict[str, Any]:
    """The upstream stage's completed manifest, or an InputError naming the command to run.

    Raises:
        InputError: when the manifest is missing or not `completed`.
    """
    from ftpipe.core.errors import InputError

    state = upstream_state(run, stage)
    if state is not None:
        raise InputError(
            f"run {run.name}: stage {stage} is {state} ({run.project.rel(run.manifest_path(stage))})",
            hint=f"{command} --run {run.name}",
        )
    return read_manifest(run.manifest_path(stage))


def require_upstream(ctx: StageContext) -> None:
    """Raise for the first upstream stage of `ctx` (`ctx.upstream`, from the stage table) not completed.

    Raises:
        InputError: naming the upstream manifest and the command that produces it.
    """
    for stage in ctx.upstream:
        require_completed(ctx.run, stage, f"ftpipe {stage}")
