"""convert-awq: 4-bit AWQ (W4A16, group size 128) of the merged model, with its quality measured.

Sits after `export-merged` and before `eval-sft` / `serve`: reads outputs/<run>/merged, calibrates
llm-compressor's AWQ on rows of the run's own training data (prepared/<data.name>/train.jsonl,
rendered with the chat template), writes outputs/<run>/awq/ (compressed-tensors safetensors,
tokenizer, chat template) and verifies it before publishing. Runs in the awq environment
(`.venv-awq`, Compose `awq-runner`) because llm-compressor pins its own transformers.

    ftpipe convert-awq --config debug_config.yaml --run my-run

The stage contract (`ftpipe/core/stage.py`):

- `check(ctx)`: every problem at once (merged model, architecture, group sizes, prepared splits,
  the awq environment); also the host pre-flight before delegating, so it imports no
  llm-compressor (the architecture list it checks is `awq_quality.AWQ_ARCHITECTURES`).
- `plan(ctx) -> ConvertAwqPlan`: the architecture checked again against llm-compressor's own
  registry, and the train / val rows read.
- `run(ctx, plan)`: load the tokenizer -> measure the merged model (val perplexity over assistant
  tokens, `ftpipe.handoff.measure`, the function eval-sft reports; greedy continuations of val
  prompts) -> quantize into a temp folder and save -> reload the files as written and measure
  them -> verify (perplexity bound, quantization kept) -> rename the folder into place. Metrics:
  both perplexities, size vs the fp16 size of the merged weights, greedy agreement.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ftpipe.core.errors import InputError, StageError
from ftpipe.core.runtime_info import cpu_native_bf16
from ftpipe.core.stage import StageContext, StageResult, upstream_state
from ftpipe.export import awq_quality as q
from ftpipe.export.artifacts import fresh_tmp_dir, replace_dir
from ftpipe.handoff.base_model import BASE_MODEL_FILE
from ftpipe.handoff.measure import greedy, perplexity
from ftpipe.handoff.prepared import Messages, prompt, read_split

log = logging.getLogger(__name__)

# Copied from the merged folder when present (the tokenizer is re-saved; these are taken verbatim).
CARRIED_FILES = ("chat_template.jinja", "generation_config.json", BASE_MODEL_FILE)
# Tokens per perplexity forward pass (rows of one width batched together): only speed and memory
# depend on it.
PERPLEXITY_BATCH_TOKENS = 4096


@dataclass(frozen=True)
class ConvertAwqPlan:
    """What convert-awq quantizes and measures, read before any model is loaded."""

    merged: Path  # outputs/<run>/merged: the model to quantize and the reference
    output: Path  # outputs/<run>/awq
    train_rows: tuple[Messages, ...]  # the calibration pool (prepared train split)
    val_file: Path  # prepared/<data.name>/val.jsonl (named in errors)
    eval_rows: tuple[Messages, ...]  # the first awq.eval_rows val rows: perplexity
    prompt_rows: tuple[Messages, ...]  # the first awq.verify_prompts val rows: greedy prompts
    dtype: str  # awq.dtype resolved for this machine (`quantize_dtype`)


@dataclass
class _Measured:
    """One model's val perplexity record (`handoff.measure.perplexity`) and greedy continuations."""

    perplexity: dict[str, Any]
    greedy: list[list[int]]

    @property
    def ppl(self) -> float:
        return self.perplexity["perplexity"]


def check(ctx: StageContext) -> dict[str, Path]:
    """Check everything convert-awq needs before any heavy work; report every problem at once.

    Checks: a completed export-merged with its merged model, an architecture llm-compressor has
    AWQ mappings for (refused alone, naming it: Gemma 4 has none), Linear sizes that are multiples of
    `awq.group_size`, the prepared train/val splits, and (local runtime, outside the awq venv)
    that the awq environment is installed. Runs on the host before delegating too.

    Returns:
        The inputs: the merged model's manifest and the prepared splits.

    Raises:
        InputError: one line listing the problems, with the commands that fix them.
    """
    from ftpipe.core.executor import environment, in_environment, installed

    cfg, run, project = ctx.config, ctx.run, ctx.project
    problems: list[str] = []
    hints: list[str] = []

    state = upstream_state(run, "export-merged")
    config_json = run.merged / "config.json"
    if state is not None:
        problems.append(
            f"run {run.name}: no merged model (stage export-merged is {state}: "
            f"{project.rel(run.manifest_path('export-merged'))})"
        )
        hints.append(f"ftpipe export-merged --run {run.name}")
    elif not config_json.is_file():
        problems.append(f"run {run.name}: merged model missing ({project.rel(config_json)} not found)")
        hints.append(f"ftpipe export-merged --run {run.name} --force")
    else:
        _refuse_unmapped(config_json, q.AWQ_ARCHITECTURES, run.name)
        bad = q.size_problems(config_json, cfg.awq.group_size)
        if bad:
            problems.append(f"{project.rel(config_json)}: " + ", ".join(bad) + " (AWQ groups need whole multiples)")
            hints.append("quantize a model whose sizes are multiples of the group size, or set --set awq.group_size=N to a divisor")

    data_dir = project.prepared_dir(cfg.data.name)
    missing = [project.rel(data_dir / f) for f in ("train.jsonl", "val.jsonl") if not (data_dir / f).is_file()]
    if missing:
        problems.append(f"prepared dataset {cfg.data.name!r} incomplete ({', '.join(missing)} not found)")
        hints.append("ftpipe preprocess-sft")

    env = environment(ctx.spec.environment)
    if cfg.runtime.mode == "local" and not in_environment(ctx.loaded.root, env):
        if not installed(ctx.loaded.root, env):  # a background build is waited for
            problems.append(f"environment 'awq' is not installed ({env.venv}/ missing)")
            hints.append("bash scripts/bootstrap.sh awq")
    elif in_environment(ctx.loaded.root, env) and importlib.util.find_spec("llmcompressor") is None:
        problems.append("llmcompressor is not importable in this environment")
        hints.append("bash scripts/bootstrap.sh awq")

    if problems:
        raise InputError("; ".join(problems), hint="; ".join(dict.fromkeys(hints)))
    return {"merged": run.manifest_path("export-merged"), "train": data_dir / "train.jsonl", "val": data_dir / "val.jsonl"}


def _refuse_unmapped(config_json: Path, known: frozenset[str], run_name: str) -> None:
    """Refuse, alone, an architecture without AWQ mappings: the other checks do not matter for it.

    Raises:
        InputError: naming the architecture and what to use instead.
    """
    unmapped = q.unmapped_architectures(config_json, known)
    if unmapped:
        raise InputError(
            f"convert-awq: architecture {', '.join(unmapped)} has no AWQ mapping in llm-compressor "
            f"(its Llama fallback would smooth the wrong layers); use the merged model or a GGUF instead",
            hint=f"ftpipe serve --run {run_name} --artifact merged, or ftpipe export-gguf --run {run_name}",
        )


def quantize_dtype(configured: str) -> tuple[str, str]:
    """awq.dtype resolved for this machine, and why.

    `auto` is bfloat16 on a CUDA GPU or a CPU with native bf16 dot products (AVX512-BF16, AMX), and
    float32 on other CPUs: there oneDNN emulates bf16, and the real-model demo's AWQ took 484 s in
    bfloat16 against 137 s in float32 (AVX2 kernels, docs/awq.md). float32 keeps the unquantized
    embeddings in float32 (a bigger output).
    """
    if configured != "auto":
        return configured, "awq.dtype"
    import torch

    if torch.cuda.is_available():
        return "bfloat16", "CUDA"
    if cpu_native_bf16():
        return "bfloat16", "CPU with native bf16"
    return "float32", "CPU without native bf16 (no avx512_bf16/amx_bf16): emulated bf16 is several times slower"


def plan(ctx: StageContext) -> ConvertAwqPlan:
    """The architecture against llm-compressor's registry (in the awq environment), and the rows.

    Raises:
        InputError: an architecture without AWQ mappings; an empty val split.
    """
    cfg, run, project = ctx.config.awq, ctx.run, ctx.project
    _refuse_unmapped(run.merged / "config.json", q.awq_architectures(), run.name)
    data_dir = project.prepared_dir(ctx.config.data.name)
    val_file = data_dir / "val.jsonl"
    val_rows = list(read_split(val_file, max(cfg.eval_rows, cfg.verify_prompts)))
    dtype, why = quantize_dtype(cfg.dtype)
    log.info("awq: quantizing in %s (%s)", dtype, why)
    if not val_rows:
        raise InputError(
            f"{project.rel(val_file)} is empty: convert-awq measures perplexity on the val split",
            hint="set preprocess.val_fraction > 0 and rerun ftpipe preprocess-sft",
        )
    return ConvertAwqPlan(
        merged=run.merged,
        output=run.awq,
        train_rows=tuple(read_split(data_dir / "train.jsonl")),
        val_file=val_file,
        eval_rows=tuple(val_rows[: cfg.eval_rows]),
        prompt_rows=tuple(val_rows[: cfg.verify_prompts]),
        dtype=dtype,
    )


def run(ctx: StageContext, plan: ConvertAwqPlan) -> StageResult:
    """Measure the merged model, quantize and save into a temp folder, measure what was saved,
    verify, then publish outputs/<run>/awq/ by renaming the folder.

    Raises:
        InputError: no assistant token to measure in the val rows.
        StageError: quantization failed, val perplexity rose more than awq.max_perplexity_increase,
            or the output reloaded without its quantization.
    """
    cfg, project = ctx.config.awq, ctx.project
    trust = ctx.config.model.trust_remote_code
    tokenizer = _load_tokenizer(plan.merged, trust)
    prompt_ids = [
        q.render(tokenizer, prompt(messages), cfg.calibration_max_length, add_generation_prompt=True)
        for messages in plan.prompt_rows
        if prompt(messages)
    ]

    def measure(model) -> _Measured:
        return _measure(model, tokenizer, plan, prompt_ids, cfg, project)

    before = _measure_merged(plan.merged, trust, measure)
    # Quantized into a temp folder next to the final one (same filesystem: the rename is atomic);
    # temp folders left by a killed earlier attempt are removed first.
    tmp = fresh_tmp_dir(plan.output)
    try:
        calibration = q.calibration_dataset(
            tokenizer, list(plan.train_rows), cfg.calibration_samples, cfg.calibration_max_length, cfg.seed
        )
        _quantize_and_save(plan.merged, tmp, tokenizer, calibration, cfg, plan.dtype, trust)
        quant_method, after = _measure_saved(tmp, plan.dtype, trust, measure)
        metrics = {**_metrics(plan.merged, tmp, tokenizer, cfg, len(calibration), quant_method, before, after),
                   "dtype": plan.dtype}
        _verify(before, after, quant_method, cfg)
        replace_dir(tmp, plan.output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    return StageResult(
        outputs=[plan.output],
        metrics=metrics,
        summary=(
            f"convert-awq: {project.rel(plan.output)} ({metrics['size_ratio_vs_fp16']:.2f}x of fp16, "
            f"perplexity {before.ppl:.2f} -> {after.ppl:.2f})"
        ),
    )


def _load_tokenizer(merged: Path, trust: bool):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(merged, trust_remote_code=trust)


def _measure(model, tokenizer, plan: ConvertAwqPlan, prompt_ids: list[list[int]], cfg, project) -> _Measured:
    """Val perplexity (assistant tokens) and greedy continuations of the val prompts.

    Raises:
        InputError: no assistant token within awq.calibration_max_length in the eval rows.
    """
    eval_rows = list(plan.eval_rows)
    ppl = perplexity(model, tokenizer, eval_rows, cfg.calibration_max_length, PERPLEXITY_BATCH_TOKENS)
    if ppl["perplexity"] is None:
        raise InputError(
            f"{project.rel(plan.val_file)}: no assistant token in the first {len(eval_rows)} rows "
            f"(within awq.calibration_max_length = {cfg.calibration_max_length} tokens): nothing to measure",
            hint="ftpipe preprocess-sft --force, or raise awq.calibration_max_length",
        )
    return _Measured(ppl, [greedy(model, tokenizer, ids, cfg.verify_max_new_tokens)[0] for ids in prompt_ids])


def _measure_merged(merged: Path, trust: bool, measure) -> _Measured:
    """The merged model as shipped: the reference for perplexity and greedy outputs."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(merged, dtype="auto", trust_remote_code=trust)
    measured = measure(reference)
    del reference
    record = measured.perplexity
    log.info("merged model: val perplexity %.3f over %d assistant tokens of %d rows (%s)", measured.ppl,
             record["assistant_tokens"], record["val_rows"], record["mask_method"])
    return measured


def _quantize_and_save(merged: Path, folder: Path, tokenizer, calibration, cfg, dtype: str, trust: bool) -> None:
    """Load the merged model in `dtype` (awq.dtype resolved), AWQ-quantize it, save it compressed with
    the tokenizer and the carried files into `folder`."""
    import torch
    from transformers import AutoModelForCausalLM

    log.info("calibrating AWQ %s on %d train rows (max %d tokens)", cfg.scheme, len(calibration), cfg.calibration_max_length)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=getattr(torch, dtype), trust_remote_code=trust)
    quantize(model, tokenizer, calibration, cfg)
    model.save_pretrained(folder, save_compressed=True)
    tokenizer.save_pretrained(folder)
    for name in CARRIED_FILES:
        if (merged / name).is_file():
            shutil.copy2(merged / name, folder / name)


def _measure_saved(folder: Path, dtype: str, trust: bool, measure) -> tuple[str | None, _Measured]:
    """The files as written, reloaded with plain transformers (compressed-tensors): their
    quantization method and measurements."""
    import torch
    from transformers import AutoModelForCausalLM

    awq_model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype), trust_remote_code=trust)
    quant_method = _quant_method(awq_model.config)
    measured = measure(awq_model)
    del awq_model
    return quant_method, measured


def _metrics(merged: Path, folder: Path, tokenizer, cfg, calibration_rows: int, quant_method: str | None,
             before: _Measured, after: _Measured) -> dict[str, Any]:
    """The manifest metrics: perplexities, sizes, greedy agreement (logged in one line)."""
    awq_bytes = q.safetensors_bytes(folder)
    fp16 = q.fp16_bytes(merged)
    increase = after.ppl / before.ppl - 1.0
    metrics = {
        "scheme": cfg.scheme,
        "group_size": cfg.group_size,
        "quant_method": quant_method,
        "calibration_rows": calibration_rows,
        "eval_rows": before.perplexity["val_rows"],
        "eval_assistant_tokens": before.perplexity["assistant_tokens"],
        "merged_perplexity": round(before.ppl, 4),
        "awq_perplexity": round(after.ppl, 4),
        "perplexity_increase": round(increase, 5),
        "max_perplexity_increase": cfg.max_perplexity_increase,
        "merged_bytes": q.safetensors_bytes(merged),
        "merged_fp16_bytes": fp16,
        "awq_bytes": awq_bytes,
        "size_ratio_vs_fp16": round(awq_bytes / fp16, 4),
        **{k: round(v, 4) for k, v in q.agreement(before.greedy, after.greedy).items()},
        "greedy_samples": [
            {"merged": tokenizer.decode(a), "awq": tokenizer.decode(b)}
            for a, b in list(zip(before.greedy, after.greedy))[:3]
        ],
    }
    log.info(
        "awq: perplexity %.3f -> %.3f (%+.2f%%), size %d -> %d bytes (%.3fx of fp16), greedy agreement %.2f",
        before.ppl, after.ppl, 100 * increase, fp16, awq_bytes, awq_bytes / fp16, metrics["greedy_token_agreement"],
    )
    return metrics


def _verify(before: _Measured, after: _Measured, quant_method: str | None, cfg) -> None:
    """The quantized model may raise val perplexity by awq.max_perplexity_increase at most, and
    must have reloaded with its quantization.

    Raises:
        StageError: either does not hold.
    """
    increase = after.ppl / before.ppl - 1.0
    if increase > cfg.max_perplexity_increase:
        raise StageError(
            f"AWQ raised val perplexity {before.ppl:.3f} -> {after.ppl:.3f} (+{100 * increase:.1f}%), "
            f"over awq.max_perplexity_increase = {cfg.max_perplexity_increase}",
            hint="more calibration rows (--set awq.calibration_samples=N), W4A16_ASYM, or a larger bound",
        )
    if quant_method != "compressed-tensors":
        raise StageError(
            f"the AWQ output reloaded without its quantization (quant_method {quant_method!r}, "
            "expected 'compressed-tensors')",
            hint="bash scripts/bootstrap.sh awq (compressed-tensors must be importable)",
        )


def quantize(model, tokenizer, calibration, cfg) -> None:
    """AWQ + W4A16 in place with llm-compressor's current recipe form (AWQ then quantization).

    Raises:
        StageError: llm-compressor failed (its message kept).
    """
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    if cfg.group_size == 128:
        quant = QuantizationModifier(targets=["Linear"], scheme=cfg.scheme, ignore=["lm_head"])
    else:
        # The presets fix group size 128; other sizes use the same preset with its group size changed.
        from compressed_tensors.quantization import preset_name_to_scheme

        scheme = preset_name_to_scheme(cfg.scheme, ["Linear"])
        scheme.weights.group_size = cfg.group_size
        quant = QuantizationModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
    recipe = [AWQModifier(duo_scaling=True, n_grid=cfg.n_grid), quant]
    try:
        with _no_pin_memory_without_accelerator():
            oneshot(
                model=model,
                tokenizer=tokenizer,
                dataset=calibration,
                recipe=recipe,
                max_seq_length=cfg.calibration_max_length,
                num_calibration_samples=len(calibration),
            )
    except Exception as exc:  # a library failure becomes one line; the traceback stays chained
        raise StageError(f"llm-compressor AWQ failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc


@contextlib.contextmanager
def _no_pin_memory_without_accelerator() -> Iterator[None]:
    """Make `IntermediatesCache.pin_memory` a no-op while no accelerator exists.

    Why: AWQ pins its cached activations before each smoothing grid search so that later
    host->device copies can be asynchronous. On a CPU-only machine there is no device, and
    `Tensor.pin_memory()` raises "Cannot access accelerator device when none is available"
    (llmcompressor/pipelines/cache.py; the versions affected: docs/awq.md). Pinning only speeds up copies
    to an accelerator, so skipping it changes nothing on the CPU. The patch is narrow: only that
    method, only when `torch.accelerator.is_available()` is False, only during `oneshot`.
    """
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        yield
        return
    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original


def _quant_method(config) -> str | None:
    """`quant_method` of a reloaded model's quantization config (a dict or a transformers object)."""
    qc = getattr(config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return getattr(method, "value", method)
