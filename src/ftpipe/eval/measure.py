"""The measurements of `eval-sft` for one or more model artifacts, in whatever environment runs it.

Given a spec (plain JSON data: which models, the val rows file, the prompt checks, settings) it
loads each artifact with transformers (and peft for an adapter), then measures:

- perplexity on the val split over assistant tokens only (the chat template's `{% generation %}`
  mask when it has one, else the text each assistant turn adds to the rendered conversation),
  in right-padded batches with `use_cache=False`;
- the prompt checks (greedy decoding, `eval.max_new_tokens`), judged by `ftpipe.eval.checks`;
- greedy sample generations for the first val rows, next to their reference answers.

The train environment calls `evaluate_spec` in process; the awq environment runs the same code
through `python -m ftpipe.eval.worker`. Only torch, transformers (peft for adapters) and the
standard library are imported here.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from ftpipe.eval.checks import judge

log = logging.getLogger(__name__)


def evaluate_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Evaluate every artifact in `spec`.

    Args:
        spec: {"artifacts": [{"name", "model", "revision", "tokenizer", "adapter"?}], "val_file",
            "max_val_rows", "max_length", "batch_tokens", "checks", "max_new_tokens", "samples",
            "dtype", "environment"}. An artifact with "adapter" is its "model" plus that peft
            adapter; when the previous artifact loaded the same base, the adapter wraps it.

    Returns:
        {"artifacts": {name: result}, "generations": [rows]}. A result has "status" "ok" or
        "failed" (with "error"): one artifact failing does not stop the others.
    """
    rows = read_val_rows(Path(spec["val_file"]), spec.get("max_val_rows"))
    results: dict[str, Any] = {}
    generations: list[dict[str, Any]] = []
    previous: tuple[str, Any] | None = None  # (model path, loaded plain model) for adapter reuse
    for art in spec["artifacts"]:
        name = art["name"]
        start = time.monotonic()
        log.info("eval %s: loading %s%s", name, art["model"], f" + adapter {art['adapter']}" if art.get("adapter") else "")
        try:
            model, tokenizer = _load(art, spec.get("dtype", "auto"), previous)
            previous = None if art.get("adapter") else (art["model"], model)
            result = _measure(model, tokenizer, rows, spec, name, generations)
        except Exception as exc:  # noqa: BLE001 - recorded as this artifact's failure; the stage fails on it
            log.exception("eval %s failed", name)
            result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:500]}
            previous = None
        result["seconds"] = round(time.monotonic() - start, 3)
        result["environment"] = spec.get("environment", "train")
        result["versions"] = _versions()
        results[name] = result
    return {"artifacts": results, "generations": generations}


def read_val_rows(path: Path, limit: int | None) -> list[list[dict[str, Any]]]:
    """The `messages` of each val row (first `limit` rows)."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            rows.append(json.loads(line)["messages"])
            if limit is not None and len(rows) >= limit:
                break
    return rows


def _load(art: dict[str, Any], dtype: str, previous: tuple[str, Any] | None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": "auto" if dtype == "auto" else getattr(torch, dtype)}
    if art.get("revision"):
        kwargs["revision"] = art["revision"]
    tokenizer = AutoTokenizer.from_pretrained(art["tokenizer"])
    if art.get("adapter"):
        from peft import PeftModel

        if previous is not None and previous[0] == art["model"]:
            base = previous[1]  # the base was just evaluated: wrap it instead of loading it again
        else:
            base = AutoModelForCausalLM.from_pretrained(art["model"], **kwargs)
        model = PeftModel.from_pretrained(base, art["adapter"])
    else:
        model = AutoModelForCausalLM.from_pretrained(art["model"], **kwargs)
    if torch.cuda.is_available() and next(model.parameters()).device.type == "cpu":
        model.to("cuda")
    model.eval()
    return model, tokenizer


def _measure(model, tokenizer, rows, spec, name, generations) -> dict[str, Any]:
    ppl = perplexity(model, tokenizer, rows, spec.get("max_length", 2048), spec.get("batch_tokens", 4096))
    checks = []
    for check in spec.get("checks") or []:
        messages = ([{"role": "system", "content": check["system"]}] if check.get("system") else [])
        messages.append({"role": "user", "content": check["prompt"]})
        output, stopped, n_tokens = generate(model, tokenizer, messages, spec.get("max_new_tokens", 32))
        failures = judge(output, stopped, check["expect"])
        checks.append({"name": check["name"], "passed": not failures, "failures": failures})
        generations.append({
            "artifact": name, "kind": "check", "name": check["name"], "prompt": check["prompt"],
            "output": output, "stopped": stopped, "new_tokens": n_tokens, "passed": not failures,
            "failures": failures,
        })
    for i, messages in enumerate(rows[: spec.get("samples", 0)]):
        last = max((j for j, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            continue
        output, stopped, n_tokens = generate(model, tokenizer, messages[:last], spec.get("max_new_tokens", 32))
        generations.append({
            "artifact": name, "kind": "sample", "name": f"val-{i}",
            "prompt": messages[last - 1]["content"] if last else "", "reference": messages[last]["content"],
            "output": output, "stopped": stopped, "new_tokens": n_tokens,
        })
    passed = sum(c["passed"] for c in checks)
    log.info("eval %s: perplexity %s, checks %d/%d", name, ppl["perplexity"], passed, len(checks))
    return {
        "status": "ok",
        **ppl,
        "checks_passed": passed,
        "checks_total": len(checks),
        "checks": checks,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def assistant_mask(tokenizer, messages: list[dict[str, Any]], max_length: int) -> tuple[list[int], list[int], str]:
    """Token ids of the rendered conversation and a 0/1 mask of its assistant tokens.

    Returns:
        (input_ids, mask, method): method is "generation-tags" when the chat template marks
        assistant turns with `{% generation %}`, else "prefix-diff" (the characters each
        assistant turn adds to the rendering, mapped to tokens with the offsets).
    """
    template = tokenizer.chat_template or ""
    if "generation" in template and "{%" in template and "endgeneration" in template:
        enc = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids, mask, method = list(enc["input_ids"]), list(enc["assistant_masks"]), "generation-tags"
    else:
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
            upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
            if upto.startswith(before) and full.startswith(upto):
                spans.append((len(before), len(upto)))
            else:
                log.warning("chat template re-renders earlier turns: assistant turn %d not scored", i)
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        mask = [int(any(s <= start < e for s, e in spans)) for start, _ in enc["offset_mapping"]]
        method = "prefix-diff"
    return ids[:max_length], mask[:max_length], method


def perplexity(model, tokenizer, rows, max_length: int, batch_tokens: int) -> dict[str, Any]:
    """exp(mean NLL) over assistant tokens of `rows`, in right-padded batches (use_cache=False).

    Returns:
        {"perplexity", "nll", "assistant_tokens", "val_rows", "mask_method"}; perplexity is None
        when no assistant token was found.
    """
    import torch
    import torch.nn.functional as F

    encoded, method = [], None
    for messages in rows:
        ids, mask, method = assistant_mask(tokenizer, messages, max_length)
        if sum(mask[1:]):
            encoded.append((ids, mask))
    encoded.sort(key=lambda e: len(e[0]), reverse=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    total_nll, total_tokens = 0.0, 0
    device = next(model.parameters()).device
    i = 0
    with torch.inference_mode():
        while i < len(encoded):
            width = len(encoded[i][0])
            size = max(1, batch_tokens // max(width, 1))
            batch = encoded[i : i + size]
            i += size
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            for b, (ids, mask) in enumerate(batch):
                n = len(ids)
                input_ids[b, :n] = torch.tensor(ids)
                attention[b, :n] = 1
                labels[b, :n] = torch.where(torch.tensor(mask, dtype=torch.bool), torch.tensor(ids), -100)
            logits = model(
                input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False
            ).logits
            target = labels[:, 1:].to(device)
            nll = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                ignore_index=-100, reduction="sum",
            )
            total_nll += float(nll)
            total_tokens += int((target != -100).sum())
    mean = total_nll / total_tokens if total_tokens else None
    return {
        "perplexity": None if mean is None else math.exp(min(mean, 700.0)),  # capped: JSON has no inf
        "nll": mean,
        "assistant_tokens": total_tokens,
        "val_rows": len(encoded),
        "mask_method": method,
    }


def generate(model, tokenizer, messages: list[dict[str, Any]], max_new_tokens: int) -> tuple[str, bool, int]:
    """Greedy continuation of a conversation as the assistant.

    Returns:
        (text without special tokens, stopped on an end-of-turn token, number of new tokens).
    """
    import torch

    enc = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    device = next(model.parameters()).device
    stop_ids = _stop_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(stop_ids), 0)
    with torch.inference_mode():
        out = model.generate(
            input_ids=enc["input_ids"].to(device),
            attention_mask=enc["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=sorted(stop_ids) or None,
            pad_token_id=pad_id,
        )
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    stopped = any(t in stop_ids for t in new)
    return tokenizer.decode(new, skip_special_tokens=True).strip(), stopped, len(new)


def _stop_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids


def _versions() -> dict[str, str]:
    versions = {}
    for name in ("torch", "transformers", "peft", "compressed-tensors"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions
