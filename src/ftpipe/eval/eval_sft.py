"""Stage `eval-sft`: base vs adapter vs DPO adapter vs merged vs AWQ vs GGUF, measured the same way, side by side.

For each artifact of the run that exists (base = the adapter's base model from
`ftpipe_base_model.json`; adapter = base + the run's LoRA adapter; dpo_adapter = base + finetune-dpo's
LoRA adapter, when that stage completed; merged = outputs/<run>/merged; awq = outputs/<run>/awq;
gguf_f16 / gguf_q8_0 / gguf_q4_k_m = outputs/<run>/gguf/model-<type>.gguf, when named in
eval.artifacts), it
measures perplexity on the val split over assistant tokens, runs the prompt checks of
`eval.prompts_file`, the general-ability checks of `eval.general_file` (each artifact but base also
gets `general_kept`: the share of the checks the base passed that it still passes), perplexity on the
held-out plain text of `eval.perplexity_file` (`text_perplexity`; the AWQ and GGUF models' relative
change against the merged model's is `text_perplexity_delta_vs_merged`) and greedy sample generations
(`ftpipe.eval.measure`). When the config has a
preference set (`preference.source`) whose held-out pairs exist (prepared/<preference.name>/val.jsonl,
written by preprocess-dpo), base, adapter and dpo_adapter also get a preference accuracy: the share
of pairs whose chosen answer has the higher summed log-prob, and the mean margin; without pairs
that column is "-" with the reason. base / adapter / dpo_adapter / merged run here, in the train
environment; the AWQ model runs in the awq environment through `python -m ftpipe.eval.worker`, the
GGUF files in the gguf environment through the same worker (llama.cpp, `ftpipe.eval.gguf`), and
their results are merged in. An artifact that is absent, or whose environment is missing, is reported
as skipped with the reason.

Writes outputs/<run>/eval/metrics.json and generations.jsonl, then checks the bounds the run must
pass (`eval.max_base_pass_rate`, `eval.min_tuned_pass_rate`, `eval.min_general_kept`,
`eval.max_text_perplexity_delta`): one missed fails the stage (exit 1) with one line naming the key,
the artifact and the value against the bound, the results already written. Needs finetune-sft completed.
`check(ctx)` (`preflight`: every problem at once, from files alone) returns the inputs to compare;
`plan(ctx)` returns the same survey as an `EvalSftPlan` (each artifact evaluated where, or skipped
why); `run(ctx, plan)` loads and measures the models. The other artifacts' stages are found through
`ctx.producers` (outputs/<run>/<artifact>, `ftpipe <stage>`).

    ftpipe eval-sft --config debug_config.yaml --run my-run
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ftpipe.core.errors import ConfigError, InputError, StageError
from ftpipe.core.executor import ENV_MARKER, ENVIRONMENTS, installed, run_tool, venv_python, wait_for_build
from ftpipe.core.fsutil import atomic_write_json, atomic_write_text, read_json
from ftpipe.core.logs import WORKER_LOG_ENV
from ftpipe.core.manifest import read_manifest
from ftpipe.core.model_ref import ModelRef
from ftpipe.core.runs import gguf_name
from ftpipe.core.stage import StageContext, StageResult, require_upstream
from ftpipe.eval.config import TUNED
from ftpipe.eval.spec import ArtifactSpec, EvalSpec
from ftpipe.eval.text import read_documents
from ftpipe.handoff.base_model import read_base_model
from ftpipe.handoff.checks import load_checks
from ftpipe.handoff.pairs import pairs_dir, read_pairs

log = logging.getLogger(__name__)

# GGUF artifact -> its type: export-gguf's outputs/<run>/gguf/model-<type>.gguf, measured with llama.cpp.
GGUF_ARTIFACTS = {"gguf_f16": "f16", "gguf_q8_0": "q8_0", "gguf_q4_k_m": "q4_k_m"}
ARTIFACTS = ("base", "adapter", "dpo_adapter", "merged", "awq", *GGUF_ARTIFACTS)
# made by other stages (`ctx.producers`: artifact -> stage; every GGUF artifact is export-gguf's "gguf")
EVALUATED_ARTIFACTS = ("dpo_adapter", "merged", "awq", "gguf")
PREFERENCE_ARTIFACTS = ("base", "adapter", "dpo_adapter")  # scored on the held-out preference pairs
QUANTIZED = ("awq", *GGUF_ARTIFACTS)  # compared with merged: text_perplexity_delta_vs_merged
AWQ_ENV_MISSING = "awq environment not installed (bash scripts/bootstrap.sh awq)"
GGUF_ENV_MISSING = "gguf environment not installed (bash scripts/bootstrap.sh gguf)"


@dataclass(frozen=True)
class Artifact:
    """One artifact to evaluate, or the reason it is skipped."""

    name: str
    environment: str = "train"
    model: str | None = None  # what from_pretrained loads (folder or hub id); the .gguf file for format gguf
    format: str = "hf"  # hf (transformers) or gguf (llama.cpp)
    revision: str | None = None
    tokenizer: str | None = None
    adapter: str | None = None
    skipped: str | None = None
    preference: bool = False  # scored on the held-out preference pairs

    def spec(self) -> ArtifactSpec:
        return ArtifactSpec(name=self.name, model=self.model, format=self.format, revision=self.revision,
                            tokenizer=self.tokenizer, adapter=self.adapter, preference=self.preference)


@dataclass(frozen=True)
class EvalSftPlan:
    """What eval-sft measures, checked before any model is loaded."""

    val_file: Path  # prepared/<data.name>/val.jsonl
    prompts_file: Path | None  # eval.prompts_file
    checks: tuple[dict[str, Any], ...]  # its checks (`ftpipe.handoff.checks.load_checks`)
    general_file: Path | None  # eval.general_file
    general: tuple[dict[str, Any], ...]  # its general-ability checks (same format)
    perplexity_file: Path | None  # eval.perplexity_file: held-out plain text
    pairs_file: Path | None  # held-out preference pairs scored, when there are any
    preference: Mapping[str, Any]  # metrics.json's `preference`: {"val_file", "pairs"} or {"status", "reason"}
    artifacts: tuple[Artifact, ...]  # every artifact of ARTIFACTS, in that order, evaluated or skipped


def check(ctx: StageContext) -> dict[str, Path]:
    """Check inputs (`preflight`); the inputs to record: finetune-sft's manifest, the val split, the
    checks and pairs files, the manifests of the other evaluated artifacts' stages, the awq
    environment's interpreter.

    Raises:
        InputError / ConfigError: as `preflight` (exit 2).
    """
    run = ctx.run
    survey = preflight(ctx)
    inputs = {"finetune": run.manifest_path("finetune-sft"), "val": survey.val_file}
    if survey.prompts_file is not None:
        inputs["prompts"] = survey.prompts_file
    if survey.general_file is not None:
        inputs["general"] = survey.general_file
    if survey.perplexity_file is not None:
        inputs["perplexity_text"] = survey.perplexity_file
    if survey.pairs_file is not None:
        inputs["pairs"] = survey.pairs_file
    for name in EVALUATED_ARTIFACTS:
        if name == "gguf" and not set(GGUF_ARTIFACTS) & set(ctx.config.eval.artifacts):
            continue  # export-gguf runs after eval-sft then: its manifest is not an input
        upstream = ctx.producers[name]
        if run.manifest_path(upstream).exists():
            inputs[name] = run.manifest_path(upstream)
    inputs["awq_environment"] = venv_python(ctx.project.root, ENVIRONMENTS["awq"])
    if set(GGUF_ARTIFACTS) & set(ctx.config.eval.artifacts):
        inputs["gguf_environment"] = venv_python(ctx.project.root, ENVIRONMENTS["gguf"])
    return inputs


def plan(ctx: StageContext) -> EvalSftPlan:
    """The checked plan (`preflight`); each skipped artifact is logged with its reason.

    Raises:
        InputError / ConfigError: as `preflight` (exit 2).
    """
    planned = preflight(ctx)
    for art in planned.artifacts:
        if art.skipped:
            log.warning("eval %s: skipped: %s", art.name, art.skipped)
    return planned


def preflight(ctx: StageContext) -> EvalSftPlan:
    """Everything eval-sft needs, checked before any model is loaded (pure: reads files only).

    Returns:
        The plan.

    Raises:
        InputError / ConfigError: finetune-sft not completed, no val split, bad checks file,
            unresolvable base model, lm-eval tasks without lm-eval; every problem found at once.
    """
    cfg, run, project = ctx.config.eval, ctx.run, ctx.project
    require_upstream(ctx)
    problems: list[str] = []
    val_file = project.prepared_dir(ctx.config.data.name) / "val.jsonl"
    if not val_file.is_file():
        problems.append(f"no val split {project.rel(val_file)}")
    elif val_file.stat().st_size == 0:
        problems.append(f"val split {project.rel(val_file)} is empty (preprocess.val_fraction is 0?)")
    base: ModelRef | None = None
    try:
        base = read_base_model(run)
    except InputError as exc:
        problems.append(exc.message)
    prompts_file, checks = _checks_file(project, cfg.prompts_file, "eval.prompts_file", problems)
    general_file, general = _checks_file(project, cfg.general_file, "eval.general_file", problems)
    perplexity_file = project.resolve(cfg.perplexity_file) if cfg.perplexity_file else None
    if perplexity_file is not None:
        try:
            read_documents(perplexity_file, cfg.perplexity_file)
        except InputError as exc:
            problems.append(exc.message)
    pairs_file, pairs_note = preference_pairs(ctx, problems)
    if problems:
        raise InputError("; ".join(problems), hint=f"ftpipe preprocess-sft, then ftpipe eval-sft --run {run.name}")
    if cfg.lm_eval_tasks and importlib.util.find_spec("lm_eval") is None:
        raise ConfigError(
            f"eval.lm_eval_tasks = {cfg.lm_eval_tasks} but lm-evaluation-harness is not installed in this environment",
            hint="`.venv/bin/pip install lm-eval`, or --set eval.lm_eval_tasks=[]",
        )
    return EvalSftPlan(
        val_file=val_file,
        prompts_file=prompts_file,
        checks=tuple(checks or ()),
        general_file=general_file,
        general=tuple(general or ()),
        perplexity_file=perplexity_file,
        pairs_file=pairs_file,
        preference=pairs_note,
        artifacts=plan_artifacts(ctx, base, scored=pairs_file is not None),
    )


def _checks_file(project, name: str | None, key: str, problems: list[str]) -> tuple[Path | None, list | None]:
    """(the resolved file, its checks) for config key `key` naming `name`; (None, None) when unset.
    A file that cannot be read or is not checks is a problem (appended to `problems`)."""
    if not name:
        return None, None
    path = project.resolve(name)
    try:
        return path, load_checks(path, name, key=key)
    except InputError as exc:
        problems.append(exc.message)
        return path, None


def preference_pairs(ctx: StageContext, problems: list[str]) -> tuple[Path | None, dict[str, Any]]:
    """The held-out preference pairs to score, or why there are none (not a failure).

    A pairs file that exists but is not pairs is a problem (appended to `problems`).

    Returns:
        (prepared/<preference.name>/val.jsonl or None, the `preference` entry of metrics.json:
        {"val_file", "pairs"} or {"status": "skipped", "reason"}).
    """
    project, pref = ctx.project, getattr(ctx.config, "preference", None)
    if pref is None or not pref.source:
        return None, {"status": "skipped", "reason": "no preference set (preference.source is not set)"}
    val = pairs_dir(project, pref.name) / "val.jsonl"
    if not val.is_file():
        return None, {"status": "skipped", "reason": f"no held-out pairs {project.rel(val)} (ftpipe preprocess-dpo)"}
    try:
        count = sum(1 for _ in read_pairs(val, ctx.config.eval.max_pairs))
    except InputError as exc:
        problems.append(exc.message)
        return None, {}
    if not count:
        return None, {"status": "skipped", "reason": f"{project.rel(val)} has no pairs (preference.val_fraction is 0?)"}
    return val, {"val_file": project.rel(val), "pairs": count}


def plan_artifacts(ctx: StageContext, base: ModelRef, scored: bool = False) -> tuple[Artifact, ...]:
    """Which artifacts are evaluated, where, and why the others are skipped (ARTIFACTS, in order).

    `scored`: held-out preference pairs exist; the PREFERENCE_ARTIFACTS evaluated are scored on them.
    """
    return tuple(_plan_artifact(ctx, name, base, scored and name in PREFERENCE_ARTIFACTS) for name in ARTIFACTS)


def _plan_artifact(ctx: StageContext, name: str, base: ModelRef, preference: bool) -> Artifact:
    run, project = ctx.run, ctx.project
    if name not in ctx.config.eval.artifacts:
        return Artifact(name, preference=preference, skipped="not in eval.artifacts")
    if name in GGUF_ARTIFACTS:
        return _plan_gguf(ctx, name)
    adapter_dir = str(run.adapter)
    # base, adapter and dpo_adapter load the adapter's base model (a LoRA on it for the adapters).
    on_base = {"model": base.load_from, "revision": base.revision if not base.path else None, "tokenizer": adapter_dir}
    if name == "base":
        return Artifact(name, **on_base, preference=preference)
    if name == "adapter":
        return Artifact(name, **on_base, adapter=adapter_dir, preference=preference)
    # dpo_adapter (a LoRA on the same base, like the SFT adapter), merged, awq: another stage's
    # product, in outputs/<run>/<artifact>, vouched for by that stage's completed manifest.
    folder = run.path / name
    upstream = ctx.producers[name]
    command = f"ftpipe {upstream}"
    manifest = read_manifest(run.manifest_path(upstream))
    status = manifest.get("status") if manifest else None
    marker = "adapter_config.json" if name == "dpo_adapter" else "config.json"
    if not (folder / marker).is_file():
        return Artifact(name, preference=preference, skipped=f"not produced ({command} --run {run.name})")
    if status != "completed":
        return Artifact(name, preference=preference, skipped=(
            f"{project.rel(folder)} exists but {upstream} is {status or 'missing'} ({command} --run {run.name})"))
    if name == "dpo_adapter":
        tokenizer = str(folder) if (folder / "tokenizer_config.json").is_file() else adapter_dir
        return Artifact(name, **{**on_base, "tokenizer": tokenizer}, adapter=str(folder), preference=preference)
    tokenizer = str(folder) if (folder / "tokenizer_config.json").is_file() else (
        str(run.merged if (run.merged / "tokenizer_config.json").is_file() else run.adapter))
    if name != "awq":
        return Artifact(name, model=str(folder), tokenizer=tokenizer, preference=preference)
    return Artifact(name, environment="awq", model=str(folder), tokenizer=tokenizer, preference=preference,
                    skipped=_other_environment(ctx, "awq", AWQ_ENV_MISSING))


def _other_environment(ctx: StageContext, environment: str, missing: str) -> str | None:
    """Why an artifact measured by the worker in `environment` cannot be (None: it can)."""
    if ctx.config.runtime.mode == "compose" or os.environ.get("FTPIPE_SERVICE"):
        return f"{environment} evaluation under --runtime compose is not supported yet (use --runtime local)"
    if not installed(ctx.project.root, ENVIRONMENTS[environment]):
        return missing
    return None


def _plan_gguf(ctx: StageContext, name: str) -> Artifact:
    """A GGUF artifact: export-gguf's outputs/<run>/gguf/model-<type>.gguf under its completed manifest,
    measured in the gguf environment on the ids of the tokenizer it was converted with (merged's)."""
    run, project = ctx.run, ctx.project
    upstream = ctx.producers["gguf"]
    command = f"ftpipe {upstream} --run {run.name}"
    outtype = GGUF_ARTIFACTS[name]
    path = run.gguf / gguf_name(outtype)
    manifest = read_manifest(run.manifest_path(upstream))
    status = manifest.get("status") if manifest else None
    if not path.is_file():
        return Artifact(name, skipped=f"not produced ({command}, with {outtype} in gguf.outtypes)")
    if status != "completed":
        return Artifact(name, skipped=f"{project.rel(path)} exists but {upstream} is {status or 'missing'} ({command})")
    tokenizer = run.merged if (run.merged / "tokenizer_config.json").is_file() else run.adapter
    return Artifact(name, environment="gguf", model=str(path), format="gguf", tokenizer=str(tokenizer),
                    skipped=_other_environment(ctx, "gguf", GGUF_ENV_MISSING))


def run(ctx: StageContext, plan: EvalSftPlan) -> StageResult:
    """Evaluate the planned artifacts, write metrics.json + generations.jsonl, then fail on a failed
    artifact or on a bound of the `eval` config the results miss (`threshold_results`)."""
    cfg, run, project = ctx.config.eval, ctx.run, ctx.project
    out = run.eval
    out.mkdir(parents=True, exist_ok=True)
    artifacts: dict[str, dict[str, Any]] = {}
    generations: list[dict[str, Any]] = []
    todo = [a for a in plan.artifacts if not a.skipped]

    local = [a for a in todo if a.environment == "train"]
    if local:
        from ftpipe.eval.measure import evaluate_spec

        result = evaluate_spec(eval_spec(ctx, plan, local, "train"))
        artifacts.update(result["artifacts"])
        generations.extend(result["generations"])

    for environment in dict.fromkeys(a.environment for a in todo if a.environment != "train"):
        arts = [a for a in todo if a.environment == environment]
        result = _run_worker(ctx, environment, eval_spec(ctx, plan, arts, ENVIRONMENTS[environment].name))
        artifacts.update(result["artifacts"])
        generations.extend(result["generations"])

    for art in plan.artifacts:
        if art.skipped:
            artifacts[art.name] = {"status": "skipped", "reason": art.skipped}
        else:
            artifacts[art.name]["model"] = project.rel(Path(art.model)) if Path(art.model).exists() else art.model
            if art.adapter:
                artifacts[art.name]["adapter"] = project.rel(Path(art.adapter))
    artifacts = {name: artifacts[name] for name in ARTIFACTS}
    add_general_kept(artifacts)
    add_text_deltas(artifacts)

    lm_eval_results = _lm_eval(cfg.lm_eval_tasks, plan.artifacts) if cfg.lm_eval_tasks else None
    bounds = threshold_results(cfg, artifacts)
    metrics_doc = {
        "run": run.name,
        "val_file": project.rel(plan.val_file),
        "prompts_file": project.rel(plan.prompts_file) if plan.prompts_file else None,
        "general_file": project.rel(plan.general_file) if plan.general_file else None,
        "perplexity_file": project.rel(plan.perplexity_file) if plan.perplexity_file else None,
        "max_new_tokens": cfg.max_new_tokens,
        "preference": dict(plan.preference),
        "artifacts": artifacts,
        "lm_eval": lm_eval_results,
        "thresholds": bounds,
    }
    atomic_write_json(out / "metrics.json", metrics_doc)
    atomic_write_text(out / "generations.jsonl", "".join(json.dumps(g, ensure_ascii=False) + "\n" for g in generations))

    failed = {n: a["error"] for n, a in artifacts.items() if a["status"] == "failed"}
    if failed:
        detail = "; ".join(f"{n}: {e}" for n, e in failed.items())
        raise StageError(
            f"eval-sft: {', '.join(failed)} failed ({detail}); partial results in {project.rel(out / 'metrics.json')}",
            hint=f"see {project.rel(ctx.log_dir / 'run.log')}",
        )
    missed = [b["message"] for b in bounds if not b["passed"]]
    if missed:
        raise StageError(
            f"eval-sft: {'; '.join(missed)}; results in {project.rel(out / 'metrics.json')}",
            hint=f"see {project.rel(out / 'generations.jsonl')}",
        )
    return StageResult(
        outputs=[out / "metrics.json", out / "generations.jsonl"],
        metrics=summary_metrics(artifacts, dict(plan.preference)),
        summary=_summary(artifacts),
    )


def eval_spec(ctx: StageContext, plan: EvalSftPlan, arts: list[Artifact], environment: str) -> EvalSpec:
    """What `evaluate_spec` measures `arts` with in `environment`: the plan's files and checks, the
    settings of the `eval` config."""
    cfg = ctx.config.eval
    return EvalSpec(
        artifacts=[a.spec() for a in arts], environment=environment, val_file=plan.val_file,
        max_val_rows=cfg.max_val_rows, max_length=cfg.max_length, batch_tokens=cfg.batch_tokens,
        checks=list(plan.checks), general=list(plan.general), max_new_tokens=cfg.max_new_tokens, samples=cfg.samples,
        generate_batch_size=cfg.generate_batch_size, dtype=ctx.config.model.dtype, pairs_file=plan.pairs_file,
        max_pairs=cfg.max_pairs, perplexity_file=plan.perplexity_file,
    )


def _run_worker(ctx: StageContext, environment: str, spec: EvalSpec) -> dict[str, Any]:
    """Evaluate the spec's artifacts in another environment via `python -m ftpipe.eval.worker`
    (one process for all of them; its log is logs/<run>/eval-sft/<environment>-worker.log)."""
    import ftpipe

    env = ENVIRONMENTS[environment]
    names = [a.name for a in spec.artifacts]
    spec_file = ctx.run.eval / f"{env.name}-spec.json"
    result_file = ctx.run.eval / f"{env.name}-result.json"
    result_file.unlink(missing_ok=True)
    spec.write(spec_file)
    wait_for_build(ctx.project.root, env)  # bootstrap.sh --background may still be building it
    python = venv_python(ctx.project.root, env)
    # Same source tree as this process, whether or not the venv has ftpipe installed.
    src = str(Path(ftpipe.__file__).resolve().parents[1])
    child_env = {**os.environ, ENV_MARKER: env.name, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
                 WORKER_LOG_ENV: str(ctx.log_dir / "run.log")}  # its log lines also go to run.log, live
    log.info("eval %s: running in environment %s (%s)", ", ".join(names), env.name, env.venv)
    try:
        run_tool(
            [python, "-m", "ftpipe.eval.worker", "--spec", spec_file, "--out", result_file],
            log_file=ctx.log_dir / f"{env.name}-worker.log", cwd=ctx.project.root, env=child_env,
            timeout=ctx.config.eval.worker_timeout,
        )
        result = read_json(result_file)
        missing = [n for n in names if not isinstance(result, dict) or n not in result.get("artifacts", {})]
        if missing:
            raise StageError(f"worker wrote no result for {', '.join(missing)} ({ctx.project.rel(result_file)})")
    except StageError as exc:
        result = {"artifacts": {n: {"status": "failed", "error": exc.message, "environment": env.name} for n in names},
                  "generations": []}
    finally:
        spec_file.unlink(missing_ok=True)
        result_file.unlink(missing_ok=True)
    return result


def _lm_eval(tasks: list[str], plan: tuple[Artifact, ...]) -> dict[str, Any]:
    """Optional lm-evaluation-harness tasks on the merged model (else base + adapter).

    Not exercised by the test suite (lm-eval is not installed here); its import is checked in
    `preflight`.
    """
    import lm_eval

    target = next((a for a in plan if a.name == "merged" and not a.skipped), None)
    if target is not None:
        model_args = f"pretrained={target.model}"
    else:
        adapter = next(a for a in plan if a.name == "adapter")
        model_args = f"pretrained={adapter.model},peft={adapter.adapter}"
    log.info("lm-eval: tasks %s on %s", ", ".join(tasks), model_args)
    out = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=list(tasks))
    return {"model_args": model_args, "results": json.loads(json.dumps(out.get("results", {}), default=str))}


def add_general_kept(artifacts: dict[str, dict[str, Any]]) -> None:
    """Set `general_kept` on every evaluated artifact but base that has general checks: the share of
    the general checks the base passed that this artifact passes too (None when the base was not
    evaluated, has no general results, or passed none of them: nothing to keep)."""
    base = artifacts.get("base") or {}
    kept_by_base = {c["name"] for c in base.get("general") or () if c.get("passed")} \
        if base.get("status") == "ok" else set()
    for name, a in artifacts.items():
        if name == "base" or a.get("status") != "ok" or "general" not in a:
            continue
        passed = {c["name"] for c in a["general"] if c.get("passed")}
        a["general_kept"] = len(kept_by_base & passed) / len(kept_by_base) if kept_by_base else None


def add_text_deltas(artifacts: dict[str, dict[str, Any]]) -> None:
    """Set `text_perplexity_delta_vs_merged` on each quantized artifact (QUANTIZED) with a text
    perplexity: (its text perplexity - merged's) / merged's, None when merged has none."""
    merged = (artifacts.get("merged") or {}).get("text_perplexity")
    for name in QUANTIZED:
        a = artifacts.get(name) or {}
        if a.get("text_perplexity") is not None:
            a["text_perplexity_delta_vs_merged"] = (a["text_perplexity"] - merged) / merged if merged else None


def threshold_results(cfg, artifacts: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each configured bound (`eval.max_base_pass_rate`, `min_tuned_pass_rate`, `min_general_kept`,
    `max_text_perplexity_delta`) checked on each artifact it applies to.

    max_base_pass_rate bounds base; min_tuned_pass_rate and min_general_kept every tuned
    full-precision artifact evaluated (TUNED: adapter, dpo_adapter, merged; a skipped one is not
    checked, but at least one must have been evaluated); max_text_perplexity_delta every quantized
    artifact evaluated (QUANTIZED). An artifact that should have a value and has none (base skipped
    or failed, general_kept None) misses the bound.

    Returns:
        [{"key", "artifact", "value", "bound", "passed", "message"}] in that order; `message` is the
        one-line account (e.g. "eval.min_tuned_pass_rate: adapter passed 0.667 (2/3 checks) < 0.8").
    """
    out: list[dict[str, Any]] = []

    def add(key: str, artifact: str | None, value: float | None, bound: float, passed: bool, message: str) -> None:
        out.append({"key": f"eval.{key}", "artifact": artifact, "value": value, "bound": bound, "passed": passed,
                    "message": f"eval.{key}: {message}"})

    def rate(a: dict[str, Any]) -> tuple[float | None, str]:
        if a.get("status") != "ok" or not a.get("checks_total"):
            return None, f"not evaluated ({a.get('reason') or a.get('error') or a.get('status')})"
        value = a["checks_passed"] / a["checks_total"]
        return value, f"{value:.3g} ({a['checks_passed']}/{a['checks_total']} checks)"

    if cfg.max_base_pass_rate is not None:
        value, shown = rate(artifacts.get("base") or {})
        ok = value is not None and value <= cfg.max_base_pass_rate
        add("max_base_pass_rate", "base", value, cfg.max_base_pass_rate, ok,
            f"base passed {shown} {'<=' if ok else '>'} {cfg.max_base_pass_rate:g}" if value is not None else f"base {shown}")
    tuned = [n for n in TUNED if (artifacts.get(n) or {}).get("status") == "ok"]
    for key, bound in (("min_tuned_pass_rate", cfg.min_tuned_pass_rate), ("min_general_kept", cfg.min_general_kept)):
        if bound is None:
            continue
        if not tuned:
            add(key, None, None, bound, False, f"no tuned artifact ({', '.join(TUNED)}) was evaluated")
        for name in tuned:
            a = artifacts[name]
            if key == "min_tuned_pass_rate":
                value, shown = rate(a)
            else:
                value = a.get("general_kept")
                shown = f"{value:.3g}" if value is not None else (
                    "None (the base passed none of the general checks, or was not evaluated)")
            ok = value is not None and value >= bound
            verb = "passed" if key == "min_tuned_pass_rate" else "general_kept"
            add(key, name, value, bound, ok,
                f"{name} {verb} {shown}" + (f" {'>=' if ok else '<'} {bound:g}" if value is not None else ""))
    if cfg.max_text_perplexity_delta is not None:
        for name in QUANTIZED:
            a = artifacts.get(name) or {}
            if a.get("status") != "ok":
                continue
            value = a.get("text_perplexity_delta_vs_merged")
            ok = value is not None and value <= cfg.max_text_perplexity_delta
            shown = f"{value:+.3g}" if value is not None else "None (merged has no text perplexity)"
            add("max_text_perplexity_delta", name, value, cfg.max_text_perplexity_delta, ok,
                f"{name} text_perplexity_delta_vs_merged {shown}"
                + (f" {'<=' if ok else '>'} {cfg.max_text_perplexity_delta:g}" if value is not None else ""))
    return out


def summary_metrics(artifacts: dict[str, dict[str, Any]], preference: dict[str, Any] | None = None) -> dict[str, Any]:
    """Manifest metrics: a compact per-artifact comparison plus the tuned model's perplexity.

    `preference`: the held-out pairs scored ({"val_file", "pairs"}) or why none were.
    """
    compact = {}
    for name, a in artifacts.items():
        keys = ("status", "reason", "error", "perplexity", "assistant_tokens", "checks_passed", "checks_total",
                "general_passed", "general_total", "general_kept", "text_perplexity", "text_perplexity_delta_vs_merged",
                "preference_accuracy", "preference_margin", "preference_pairs", "seconds", "environment")
        compact[name] = {k: a[k] for k in keys if k in a}
    metrics: dict[str, Any] = {"artifacts": compact, "preference": preference or {}}
    for name, a in artifacts.items():
        if a.get("perplexity") is not None:
            metrics[f"perplexity_{name}"] = a["perplexity"]
        if a.get("checks_total"):
            metrics[f"checks_passed_{name}"] = a["checks_passed"]
        if a.get("preference_accuracy") is not None:
            metrics[f"preference_accuracy_{name}"] = a["preference_accuracy"]
    tuned = next((artifacts[n] for n in ("adapter", "merged", "awq") if artifacts[n].get("perplexity") is not None), None)
    if tuned is not None:
        metrics["perplexity"] = tuned["perplexity"]
    return metrics


def _summary(artifacts: dict[str, dict[str, Any]]) -> str:
    done = [n for n, a in artifacts.items() if a["status"] == "ok"]
    skipped = [n for n, a in artifacts.items() if a["status"] == "skipped"]
    text = f"eval-sft: evaluated {', '.join(done) or 'nothing'}"
    return text + (f"; skipped {', '.join(skipped)}" if skipped else "")
