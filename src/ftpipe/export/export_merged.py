"""`export-merged`: merge the run's LoRA adapter into its base model and verify the result.

Pipeline position: finetune-sft -> **export-merged** -> convert-awq / export-gguf / eval / serve.
Runs in the train environment (.venv).

    ftpipe export-merged --config debug_config.yaml --run my-run

The stage contract (`ftpipe/core/stage.py`):

- `check(ctx)`: a completed finetune-sft whose `adapter/` is an adapter (not a full model);
  returns the finetune-sft manifest and the adapter as the inputs.
- `plan(ctx) -> ExportMergedPlan`: the base model named by the adapter's `ftpipe_base_model.json`
  (resolved once: a local folder or the hub id), the load settings and the sample conversations
  of the logit check (the run's val split when present).
- `run(ctx, plan)`: load the base in its own dtype and apply the adapter -> record reference
  logits -> `merge_and_unload` -> save safetensors + tokenizer (plus the base's tokenizer files the
  save does not write again, e.g. SentencePiece's tokenizer.model) + chat template +
  generation_config (EOS = the chat template's end-of-turn token and every end-of-turn id of the
  base) into a temp folder next to `merged/` -> reload it from disk and compare logits (max abs
  diff -> manifest; above `merge.max_abs_logit_diff` -> StageError) -> check the file set -> rename
  the folder into place. A crash never leaves a `merged/` that looks complete; a second run with
  the same inputs is skipped.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftpipe.core.errors import InputError, StageError
from ftpipe.core.model_ref import ModelRef
from ftpipe.core.runs import Project
from ftpipe.core.stage import StageContext, StageResult, require_upstream
from ftpipe.export.artifacts import (
    CHAT_TEMPLATE_FILE,
    fresh_tmp_dir,
    replace_dir,
    require_full_model,
    weight_files,
)
from ftpipe.handoff.base_model import BASE_MODEL_FILE, read_base_model
from ftpipe.handoff.prepared import Messages, sample_conversations

log = logging.getLogger(__name__)

MAX_VERIFY_TOKENS = 256  # tokens per sample conversation in the logit check
REQUIRED_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", CHAT_TEMPLATE_FILE, BASE_MODEL_FILE)
# Tokenizer files a base may ship that `save_pretrained` of a fast tokenizer does not write again:
# SentencePiece families (Phi-3, Mistral, Llama 2) need tokenizer.model downstream (llama.cpp's
# Phi-3 converter reads it, and only it). Copied from the base when the saved folder lacks them.
BASE_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "special_tokens_map.json", "added_tokens.json")


@dataclass(frozen=True)
class ExportMergedPlan:
    """What export-merged merges, resolved before any model is loaded."""

    adapter: Path  # outputs/<run>/adapter
    output: Path  # outputs/<run>/merged
    base: ModelRef  # the base the adapter was trained on (its ftpipe_base_model.json)
    dtype: str  # model.dtype: "auto" (the checkpoint's own) or a torch dtype name
    trust_remote_code: bool
    conversations: tuple[Messages, ...]  # the sample conversations of the logit check
    conversations_source: str  # the prepared split they come from, or "built-in"


def check(ctx: StageContext) -> dict[str, Path]:
    """A completed finetune-sft with an adapter (not a full model) to merge.

    Returns:
        The inputs: finetune-sft's manifest and the adapter folder.

    Raises:
        InputError: no completed finetune-sft, adapter missing or already a full model.
    """
    require_upstream(ctx)
    run = ctx.run
    _check_adapter(run.adapter, ctx.project, run.name)
    return {"finetune-sft": run.manifest_path("finetune-sft"), "adapter": run.adapter}


def _check_adapter(adapter: Path, project: Project, run_name: str) -> None:
    if not adapter.is_dir():
        raise InputError(
            f"run {run_name}: no adapter at {project.rel(adapter)}", hint=f"ftpipe finetune-sft --run {run_name}"
        )
    if not (adapter / "adapter_config.json").is_file():
        if (adapter / "config.json").is_file():
            # Already a full model (e.g. `finetune.method: full`, or a merged copy): nothing to merge.
            raise InputError(
                f"{project.rel(adapter)} is a full model (config.json, no adapter_config.json): "
                "there is nothing to merge; use it directly",
                hint=f"ftpipe export-gguf --run {run_name}",
            )
        raise InputError(
            f"{project.rel(adapter)}: adapter_config.json missing (incomplete adapter)",
            hint=f"ftpipe finetune-sft --run {run_name} --force",
        )


def plan(ctx: StageContext) -> ExportMergedPlan:
    """The base model (from the adapter's record) and the conversations of the logit check.

    Raises:
        InputError: the base-model record is missing or names a model that cannot be found; a
            prepared split holds a bad line.
    """
    run, cfg = ctx.run, ctx.config
    conversations, source = sample_conversations(ctx.project, cfg.data.name, cfg.merge.verify_prompts)
    return ExportMergedPlan(
        adapter=run.adapter,
        output=run.merged,
        base=read_base_model(run),
        dtype=cfg.model.dtype,
        trust_remote_code=cfg.model.trust_remote_code,
        conversations=tuple(conversations),
        conversations_source=source,
    )


def run(ctx: StageContext, plan: ExportMergedPlan) -> StageResult:
    """Merge, save to a temp folder, verify, move into place.

    Raises:
        InputError: neither the adapter's tokenizer nor the base has a chat template.
        StageError: the merged model's logits drift above the threshold, or files are missing.
    """
    project = ctx.project
    tokenizer = _load_tokenizer(plan, project, ctx.run.name)
    model, dtype, tied = _load_base_with_adapter(plan)

    batches = [_encode(tokenizer, conv) for conv in plan.conversations]
    reference = _logits(model, batches)
    log.info("reference logits: %d sample conversations from %s (dtype %s)",
             len(batches), plan.conversations_source, dtype)

    merged = _merge(model, tied, tokenizer, plan.base)
    tmp = fresh_tmp_dir(plan.output)
    try:
        _save(merged, tokenizer, plan, tmp)
        del merged, model  # the reload below needs the memory
        verified = _verify(tmp, project, plan, batches, reference, dtype, ctx.config.merge)
        replace_dir(tmp, plan.output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)

    metrics = {
        "max_abs_logit_diff": verified["max_abs_logit_diff"],
        "threshold": verified["threshold"],
        "verify_conversations": len(batches),
        "verify_tokens": sum(int(b.shape[1]) for b in batches),
        "verify_source": plan.conversations_source,
        "dtype": str(dtype).removeprefix("torch."),
        "tied_embeddings": verified["tied_embeddings"],
        "eos_token_ids": verified["eos_token_ids"],
        "tokenizer_files": sorted(p.name for p in plan.output.iterdir()
                                  if p.name.startswith(("tokenizer", "special_tokens", "added_tokens"))),
        "weight_files": len(weight_files(plan.output)),
    }
    return StageResult(
        outputs=[plan.output],
        metrics=metrics,
        summary=f"merged model -> {project.rel(plan.output)} (max abs logit diff {verified['max_abs_logit_diff']:.2g})",
    )


def _load_tokenizer(plan: ExportMergedPlan, project: Project, run_name: str):
    """The adapter's tokenizer, with the base's chat template when the adapter has none.

    Raises:
        InputError: neither has a chat template.
    """
    from transformers import AutoTokenizer

    log.info("base model: %s", plan.base.load_from)
    tokenizer = AutoTokenizer.from_pretrained(plan.adapter)
    if not tokenizer.chat_template:
        base_tok = AutoTokenizer.from_pretrained(plan.base.load_from, **plan.base.pretrained_kwargs())
        tokenizer.chat_template = base_tok.chat_template
    if not tokenizer.chat_template:
        raise InputError(
            f"{project.rel(plan.adapter)}: no chat template in the adapter's tokenizer nor in the base model",
            hint=f"ftpipe finetune-sft --run {run_name} --force",
        )
    return tokenizer


def _load_base_with_adapter(plan: ExportMergedPlan):
    """(base + adapter as a peft model in eval mode, the base's dtype, whether its embeddings are tied)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    load_kwargs = {
        "dtype": "auto" if plan.dtype == "auto" else getattr(torch, plan.dtype),
        "trust_remote_code": plan.trust_remote_code,
        **plan.base.pretrained_kwargs(),
    }
    base = AutoModelForCausalLM.from_pretrained(plan.base.load_from, **load_kwargs)
    dtype = base.dtype
    tied = bool(getattr(base.config, "tie_word_embeddings", False))
    model = PeftModel.from_pretrained(base, plan.adapter)
    model.eval()
    return model, dtype, tied


def _merge(model, tied: bool, tokenizer, base: ModelRef):
    """`merge_and_unload`, ties kept consistent, the generation config with every end-of-turn id."""
    merged = model.merge_and_unload()
    _keep_ties_consistent(merged, tied)
    merged.generation_config = _generation_config(base.load_from, merged, tokenizer, base.pretrained_kwargs())
    return merged


def _save(merged, tokenizer, plan: ExportMergedPlan, folder: Path) -> None:
    """Weights (safetensors), tokenizer, chat template, base-model record and the base's tokenizer
    files the save does not write again, into `folder`."""
    merged.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    if not (folder / CHAT_TEMPLATE_FILE).is_file():  # older tokenizers embed it in tokenizer_config.json
        (folder / CHAT_TEMPLATE_FILE).write_text(tokenizer.chat_template, encoding="utf-8")
    shutil.copy2(plan.adapter / BASE_MODEL_FILE, folder / BASE_MODEL_FILE)
    _carry_base_tokenizer_files(plan.base, folder)


def _verify(folder: Path, project: Project, plan: ExportMergedPlan, batches, reference, dtype, cfg) -> dict[str, Any]:
    """Reload `folder` from disk, compare its logits with the reference and check its file set.

    Returns:
        max_abs_logit_diff, threshold, tied_embeddings and eos_token_ids of the reloaded model.

    Raises:
        StageError: the logits differ above the threshold, or the folder is incomplete.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=plan.trust_remote_code)
    reloaded.eval()
    diff = max(float((ref - new).abs().max()) for ref, new in zip(reference, _logits(reloaded, batches)))
    threshold = cfg.max_abs_logit_diff if dtype == torch.float32 else cfg.max_abs_logit_diff_16bit
    log.info("merged vs base+adapter: max abs logit diff %.3g (threshold %.3g, %s)", diff, threshold, dtype)
    if diff > threshold:
        raise StageError(
            f"merged model logits differ from base+adapter by {diff:.3g} > merge.max_abs_logit_diff "
            f"{threshold:.3g} ({dtype}); the merge is not faithful",
            hint="check the adapter and base revision; raise the threshold only for low-precision bases",
        )
    reload_tok = AutoTokenizer.from_pretrained(folder)
    eos_ids = _as_list(reloaded.generation_config.eos_token_id)
    _check_file_set(folder, project, reload_tok, eos_ids, _as_list(_base_generation_eos(plan.base)))
    return {
        "max_abs_logit_diff": diff,
        "threshold": threshold,
        "tied_embeddings": bool(getattr(reloaded.config, "tie_word_embeddings", False)),
        "eos_token_ids": eos_ids,
    }


def _encode(tokenizer, conversation):
    text = tokenizer.apply_chat_template(conversation, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return ids[:, :MAX_VERIFY_TOKENS]


def _logits(model, batches):
    import torch

    with torch.no_grad():
        return [model(input_ids=ids).logits.float() for ids in batches]


def _keep_ties_consistent(model, tied: bool) -> None:
    # A LoRA on lm_head (or on the embeddings) of a tied model changes one side only after the
    # merge; saving it as tied would silently drop that change. Untie explicitly in that case.
    if not tied:
        return
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if emb.data_ptr() == head.data_ptr():
        return
    if emb.shape == head.shape and bool((emb == head).all()):
        model.tie_weights()
        return
    log.warning("the adapter changed lm_head and the embeddings differently: saving them untied")
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False


def _generation_config(base_path: str, model, tokenizer, kwargs: dict):
    """The base's generation config, with the chat template's end-of-turn token among the EOS ids."""
    from transformers import GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(base_path, **kwargs)
    except OSError:
        gen = GenerationConfig.from_model_config(model.config)
    eos = _as_list(gen.eos_token_id) or _as_list(model.config.eos_token_id)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos = [tokenizer.eos_token_id, *eos]
    # A base model trained with model.chat_template (ChatML on a model whose EOS is <|endoftext|>)
    # ends its turns with the template's token: generation must stop there too.
    from ftpipe.handoff.measure import template_end_of_turn

    turn_end = template_end_of_turn(tokenizer)
    if turn_end is not None and turn_end not in eos:
        eos = [*eos, turn_end]
    gen.eos_token_id = eos[0] if len(eos) == 1 else eos
    if gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    return gen


def _carry_base_tokenizer_files(base_ref, folder: Path) -> list[str]:
    """Copy the base's tokenizer files that `folder` lacks (local folder or hub cache); their names."""
    from transformers.utils import cached_file

    carried = []
    for name in BASE_TOKENIZER_FILES:
        if (folder / name).is_file():
            continue
        found = cached_file(base_ref.load_from, name, _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False, **base_ref.pretrained_kwargs())
        if found:
            shutil.copy2(found, folder / name)
            carried.append(name)
    carried += _carry_bos_eos_flags(base_ref, folder)
    if carried:
        log.info("carried from the base: %s", ", ".join(carried))
    return carried


def _carry_bos_eos_flags(base_ref, folder: Path) -> list[str]:
    """Keep the base's `add_bos_token` / `add_eos_token` in tokenizer_config.json.

    transformers' tokenizer save does not write them back (docs/export-merged.md names the
    versions), and llama.cpp's converter reads them there: without them a SentencePiece GGUF falls
    back to adding BOS, which a template like Phi-3.5's (no BOS) never had in training.
    """
    import json

    from transformers.utils import cached_file

    found = cached_file(base_ref.load_from, "tokenizer_config.json", _raise_exceptions_for_missing_entries=False,
                        _raise_exceptions_for_connection_errors=False, **base_ref.pretrained_kwargs())
    target = folder / "tokenizer_config.json"
    if not found or not target.is_file():
        return []
    base = json.loads(Path(found).read_text(encoding="utf-8"))
    merged = json.loads(target.read_text(encoding="utf-8"))
    keys = [k for k in ("add_bos_token", "add_eos_token") if isinstance(base.get(k), bool) and k not in merged]
    if keys:
        merged.update({k: base[k] for k in keys})
        target.write_text(json.dumps(merged, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return [f"tokenizer_config.json:{k}" for k in keys]


def _base_generation_eos(base_ref):
    """The base's generation_config eos_token_id (None when it has no generation_config.json)."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(base_ref.load_from, **base_ref.pretrained_kwargs()).eos_token_id
    except OSError:
        return None


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [int(value)]


def _check_file_set(folder: Path, project: Project, tokenizer, eos_ids: list[int], base_eos: list[int]) -> None:
    """Everything a downstream stage loads must be there; otherwise StageError."""
    problems = [f"{name} missing" for name in REQUIRED_FILES if not (folder / name).is_file()]
    lost = [i for i in base_eos if i not in eos_ids]
    if lost:
        problems.append(f"generation_config eos_token_id {eos_ids} lost the base's end-of-turn ids {lost}")
    try:
        require_full_model(folder, project, hint="")
    except InputError as exc:
        problems.append(exc.message)
    if not tokenizer.chat_template:
        problems.append("the reloaded tokenizer has no chat template")
    if tokenizer.eos_token_id is None or tokenizer.eos_token_id not in eos_ids:
        problems.append(f"tokenizer EOS {tokenizer.eos_token!r} is not in generation_config eos_token_id {eos_ids}")
    if problems:
        raise StageError(f"merged model in {project.rel(folder)} is incomplete: {'; '.join(problems)}")
