"""The measurements of `eval-sft` for one or more model artifacts, in whatever environment runs it.

Given a spec (`ftpipe.eval.spec.EvalSpec`: which models, the val rows file, the prompt checks, settings) it
loads each artifact with transformers (and peft for an adapter), then measures:

- perplexity on the val split over assistant tokens only (`ftpipe.handoff.measure.perplexity`,
  the same function convert-awq compares the merged and AWQ models with);
- the prompt checks (greedy decoding, `eval.max_new_tokens`), judged by `ftpipe.handoff.checks`,
  and the general-ability checks of `eval.general_file` the same way; checks, general checks and
  samples are answered together in left-padded batches of `eval.generate_batch_size` prompts
  (`ftpipe.handoff.measure.generate_batch`);
- perplexity on held-out plain text (`eval.perplexity_file`, no chat template, windows of
  `eval.max_length` tokens: `ftpipe.eval.text`) as `text_perplexity`;
- greedy sample generations of the val rows' prompts (`ftpipe.handoff.prepared.prompt`), next to
  their reference answers;
- for the artifacts marked `preference` (base, adapter, dpo_adapter) when the spec names held-out
  preference pairs: preference accuracy, the share of pairs whose chosen answer has the higher
  summed log-prob given the prompt, and the mean margin (`ftpipe.handoff.measure.preference_accuracy`).

The train environment calls `evaluate_spec` in process; the awq environment runs the same code
through `python -m ftpipe.eval.worker`, and so does the gguf environment, where a GGUF artifact is
measured with llama.cpp instead (`ftpipe.eval.gguf`: the same checks, token ids and judging). Only torch, transformers (peft for adapters), the
standard library and `ftpipe.handoff` / `ftpipe.core.errors` are imported here.

    ftpipe eval-sft --config debug_config.yaml --run my-run
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import time
from typing import TYPE_CHECKING, Any, Callable

from ftpipe.eval.text import read_documents, text_windows
from ftpipe.handoff.checks import judge
from ftpipe.handoff.measure import generate_batch, perplexity, preference_accuracy
from ftpipe.handoff.pairs import read_pairs
from ftpipe.handoff.prepared import prompt, read_split, reference

if TYPE_CHECKING:
    from ftpipe.eval.spec import ArtifactSpec, EvalSpec

log = logging.getLogger(__name__)


def evaluate_spec(spec: EvalSpec) -> dict[str, Any]:
    """Evaluate every artifact in `spec`.

    Args:
        spec: the artifacts and settings (`ftpipe.eval.spec.EvalSpec`). An artifact with an
            `adapter` is its `model` plus that peft adapter; when the previous artifact loaded
            the same base, the adapter wraps it.

    Returns:
        {"artifacts": {name: result}, "generations": [rows]}. A result has "status" "ok" or
        "failed" (with "error"): one artifact failing does not stop the others.
    """
    rows = list(read_split(spec.val_file, spec.max_val_rows))  # every artifact measures the same rows
    documents = read_documents(spec.perplexity_file) if spec.perplexity_file else []
    pairs = list(read_pairs(spec.pairs_file, spec.max_pairs)) if spec.pairs_file else []
    results: dict[str, Any] = {}
    generations: list[dict[str, Any]] = []
    previous: tuple[str, Any] | None = None  # (model path, loaded plain model) for adapter reuse
    for art in spec.artifacts:
        name = art.name
        start = time.monotonic()
        log.info("eval %s: loading %s%s", name, art.model, f" + adapter {art.adapter}" if art.adapter else "")
        try:
            if art.format == "gguf":
                from ftpipe.eval.gguf import evaluate_gguf  # llama-cpp-python: the gguf environment only

                result = evaluate_gguf(art, rows, documents, spec, generations)
            else:
                model, tokenizer = _load(art, spec.dtype, previous)
                previous = None if art.adapter else (art.model, model)
                result = _measure(model, tokenizer, rows, spec, name, generations)
                if documents:
                    result.update(text_perplexity(model, text_windows(tokenizer, documents, spec.max_length), spec.batch_tokens))
                if art.preference and pairs:
                    result.update(_preference(model, tokenizer, pairs, spec, name))
            if documents:
                log.info("eval %s: text perplexity %s over %d tokens", name, result["text_perplexity"], result["text_tokens"])
        except Exception as exc:  # noqa: BLE001 - recorded as this artifact's failure; the stage fails on it
            log.exception("eval %s failed", name)
            result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:500]}
            previous = None
        result["seconds"] = round(time.monotonic() - start, 3)
        result["environment"] = spec.environment
        result["versions"] = _versions()
        results[name] = result
    return {"artifacts": results, "generations": generations}


def _load(art: ArtifactSpec, dtype: str, previous: tuple[str, Any] | None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": "auto" if dtype == "auto" else getattr(torch, dtype)}
    if art.revision:
        kwargs["revision"] = art.revision
    tokenizer = AutoTokenizer.from_pretrained(art.tokenizer)
    if art.adapter:
        from peft import PeftModel

        if previous is not None and previous[0] == art.model:
            base = previous[1]  # the base was just evaluated: wrap it instead of loading it again
        else:
            base = AutoModelForCausalLM.from_pretrained(art.model, **kwargs)
        model = PeftModel.from_pretrained(base, art.adapter)
    else:
        model = AutoModelForCausalLM.from_pretrained(art.model, **kwargs)
    if torch.cuda.is_available() and next(model.parameters()).device.type == "cpu":
        model.to("cuda")
    model.eval()
    return model, tokenizer


def _measure(model, tokenizer, rows, spec: EvalSpec, name, generations) -> dict[str, Any]:
    ppl = perplexity(model, tokenizer, rows, spec.max_length, spec.batch_tokens)

    def answer_all(conversations):
        return generate_batch(model, tokenizer, conversations, spec.max_new_tokens, spec.generate_batch_size)

    result = measure_answers(answer_all, rows, spec, name, generations)
    log.info("eval %s: perplexity %s, checks %d/%d", name, ppl["perplexity"], result["checks_passed"], result["checks_total"])
    return {"status": "ok", **ppl, **result, "parameters": sum(p.numel() for p in model.parameters())}


Answer = tuple[str, bool, int]  # (text, stopped on an end-of-turn token, new tokens)


def one_at_a_time(answer: Callable[[list[dict[str, Any]]], Answer]) -> Callable[[list[list[dict[str, Any]]]], list[Answer]]:
    """`measure_answers`'s `answer_all` from a function that answers one conversation (llama.cpp's)."""
    return lambda conversations: [answer(messages) for messages in conversations]


def measure_answers(answer_all: Callable[[list[list[dict[str, Any]]]], list[Answer]], rows, spec: EvalSpec, name: str,
                    generations: list[dict[str, Any]]) -> dict[str, Any]:
    """The prompt checks, the general checks and the sample generations of one artifact, answered by
    `answer_all(conversations) -> [(text, stopped on an end-of-turn token, new tokens)]` in one call
    (greedy; batched transformers here, llama.cpp one at a time in `ftpipe.eval.gguf`); each answer is
    also appended to `generations`: the checks, then the general checks, then the samples.

    Returns:
        {"checks_passed", "checks_total", "checks"} and, with general checks, "general_passed",
        "general_total", "general".
    """
    samples = [(i, prompt(messages), expected) for i, messages in enumerate(rows[: spec.samples])
               if (expected := reference(messages)) is not None]
    asked = [_messages(c) for c in spec.checks] + [_messages(c) for c in spec.general] + [p for _, p, _ in samples]
    answers = answer_all(asked)
    if len(answers) != len(asked):
        raise RuntimeError(f"eval {name}: {len(answers)} answers to {len(asked)} prompts")
    n_checks, n_general = len(spec.checks), len(spec.general)
    checks = _judge(spec.checks, answers[:n_checks], name, "check", generations)
    general = _judge(spec.general, answers[n_checks:n_checks + n_general], name, "general", generations)
    for (i, messages, expected), (output, stopped, n_tokens) in zip(samples, answers[n_checks + n_general:]):
        generations.append({
            "artifact": name, "kind": "sample", "name": f"val-{i}",
            "prompt": messages[-1]["content"] if messages else "", "reference": expected,
            "output": output, "stopped": stopped, "new_tokens": n_tokens,
        })
    result: dict[str, Any] = {"checks_passed": sum(c["passed"] for c in checks), "checks_total": len(checks),
                              "checks": checks}
    if general:
        result.update(general_passed=sum(c["passed"] for c in general), general_total=len(general), general=general)
        log.info("eval %s: general checks %d/%d", name, result["general_passed"], result["general_total"])
    return result


def _messages(check) -> list[dict[str, Any]]:
    """The conversation a check asks: its system message, if any, and its prompt."""
    messages = [{"role": "system", "content": check.system}] if check.system else []
    return [*messages, {"role": "user", "content": check.prompt}]


def _judge(checks, answers: list[Answer], name: str, kind: str, generations) -> list[dict[str, Any]]:
    """Judge the answers to `checks`; each answer is also a generations row of `kind` ("check" for
    eval.prompts_file, "general" for eval.general_file)."""
    judged = []
    for check, (output, stopped, n_tokens) in zip(checks, answers):
        failures = judge(output, stopped, check.expect)
        judged.append({"name": check.name, "passed": not failures, "failures": failures})
        generations.append({
            "artifact": name, "kind": kind, "name": check.name, "prompt": check.prompt,
            "output": output, "stopped": stopped, "new_tokens": n_tokens, "passed": not failures,
            "failures": failures, "expect": check.expect,
        })
    return judged


def text_perplexity(model, windows: list[list[int]], batch_tokens: int) -> dict[str, Any]:
    """exp(mean NLL) over every token of `windows` but each window's first (plain text: no mask), in
    right-padded batches of at most `batch_tokens` tokens, use_cache=False.

    Returns:
        {"text_perplexity", "text_nll", "text_tokens" (tokens scored), "text_windows"}.
    """
    import torch
    import torch.nn.functional as F

    windows = sorted(windows, key=len, reverse=True)
    device = next(model.parameters()).device
    total_nll, total_tokens, i = 0.0, 0, 0
    with torch.inference_mode():
        while i < len(windows):
            width = len(windows[i])
            batch = windows[i : i + max(1, batch_tokens // width)]
            i += len(batch)
            input_ids = torch.zeros((len(batch), width), dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            for b, ids in enumerate(batch):
                input_ids[b, : len(ids)] = labels[b, : len(ids)] = torch.tensor(ids)
                attention[b, : len(ids)] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False).logits
            target = labels[:, 1:].to(device)
            total_nll += float(F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                                               ignore_index=-100, reduction="sum"))
            total_tokens += int((target != -100).sum())
    mean = total_nll / total_tokens if total_tokens else None
    return {"text_perplexity": None if mean is None else math.exp(min(mean, 700.0)),  # capped: JSON has no inf
            "text_nll": mean, "text_tokens": total_tokens, "text_windows": len(windows)}


def _preference(model, tokenizer, pairs, spec: EvalSpec, name: str) -> dict[str, Any]:
    scored = preference_accuracy(model, tokenizer, pairs, spec.max_length)
    log.info("eval %s: preference accuracy %s over %d pairs (mean margin %s)", name, scored["accuracy"],
             scored["pairs"], scored["mean_margin"])
    return {"preference_accuracy": scored["accuracy"], "preference_margin": scored["mean_margin"],
            "preference_pairs": scored["pairs"]}


def _versions() -> dict[str, str]:
    versions = {}
    for name in ("torch", "transformers", "peft", "compressed-tensors", "llama_cpp_python"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions
