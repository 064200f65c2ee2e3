"""The one perplexity and the one greedy decoding, shared by `convert-awq` and `eval-sft`.

- `perplexity`: exp(mean NLL) over the assistant tokens of chat conversations (the chat
  template's `{% generation %}` mask when it has one, else the text each assistant turn adds to
  the rendered conversation), in right-padded batches with `use_cache=False`. eval-sft reports it
  per artifact; convert-awq compares the merged and AWQ models with it
  (`awq.max_perplexity_increase`), so the two stages never disagree on what perplexity means.
- `greedy` (token ids) and `generate` (a conversation, answered as text): greedy decoding that
  stops at the model's end-of-turn tokens.

Only torch and transformers are imported, inside the functions (the awq environment's eval
worker and convert-awq run this code too).

    ftpipe eval-sft --config debug_config.yaml --run my-run
"""

from __future__ import annotations

import logging
import math
from typing import Any

log = logging.getLogger(__name__)


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


def greedy(model, tokenizer, input_ids: list[int], max_new_tokens: int) -> tuple[list[int], bool]:
    """Greedy continuation of `input_ids`, ending at an end-of-turn token or `max_new_tokens`.

    End-of-turn tokens: the model's generation_config EOS ids and the tokenizer's EOS.

    Returns:
        (new token ids, stopped on an end-of-turn token).
    """
    import torch

    device = next(model.parameters()).device
    stop_ids = _stop_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(stop_ids), 0)
    ids = torch.tensor([list(input_ids)], dtype=torch.long, device=device)
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=sorted(stop_ids) or None,
            pad_token_id=pad_id,
        )
    new = out[0, ids.shape[1]:].tolist()
    return new, any(t in stop_ids for t in new)


def generate(model, tokenizer, messages: list[dict[str, Any]], max_new_tokens: int) -> tuple[str, bool, int]:
    """Greedy continuation of a conversation as the assistant (chat template + generation prompt).

    Returns:
        (text without special tokens, stopped on an end-of-turn token, number of new tokens).
    """
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    new, stopped = greedy(model, tokenizer, list(enc["input_ids"]), max_new_tokens)
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

