"""The one assistant mask, perplexity and greedy decoding, shared by finetune-sft, convert-awq and eval-sft.

- `encode_conversation` / `assistant_mask`: the one definition of the assistant tokens of a
  conversation (the chat template's `{% generation %}` mask when it has one, else each assistant
  turn's content and end-of-turn token), used by finetune-sft's labels and by perplexity.
- `perplexity`: exp(mean NLL) over those tokens, in right-padded batches with
  `use_cache=False`. eval-sft reports it per artifact; convert-awq compares the merged and AWQ models with it
  (`awq.max_perplexity_increase`), so the two stages never disagree on what perplexity means.
- `greedy` (token ids) and `generate` (a conversation, answered as text): greedy decoding that
  stops at the model's end-of-turn tokens; `greedy_batch` / `generate_batch` the same for many
  prompts in left-padded batches (eval-sft's checks and samples, `eval.generate_batch_size`).
- `preference_logps` / `preference_accuracy`: the summed log-probability of each answer of a
  preference pair (the completion tokens after the rendered prompt, as TRL's DPOTrainer scores
  them) and the share of pairs whose chosen answer is the likelier one (finetune-dpo's tests, eval).

Only torch and transformers are imported, inside the functions (the awq environment's eval
worker and convert-awq run this code too).

    ftpipe eval-sft --config debug_config.yaml --run my-run
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class Encoded:
    """One conversation as training and perplexity see it (`encode_conversation`)."""

    input_ids: list[int]
    mask: list[int]  # 1 on the assistant tokens (the target), 0 elsewhere
    method: str  # "generation-tags" or "prefix-diff"
    turns: int  # assistant turns in the conversation
    unlocated: int  # assistant turns whose tokens could not be located (left out of the mask, logged)


def end_of_turn_ids(tokenizer, generation_config=None) -> set[int]:
    """The token ids that end an assistant turn: the tokenizer's EOS, the generation config's EOS ids
    and the special token the chat template writes after an assistant turn's content (Phi-3.5 ends a
    turn with `<|end|>`, which only its generation config and its template name)."""
    probed = template_end_of_turn(tokenizer) if isinstance(tokenizer.chat_template, str) else None
    ids: set[int] = set() if probed is None else {probed}
    eos = getattr(generation_config, "eos_token_id", None)
    for value in (eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids


def has_generation_tags(template: str | None) -> bool:
    """Whether a chat template marks the assistant's tokens with `{% generation %}...{% endgeneration %}`."""
    return bool(template) and re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None \
        and "endgeneration" in template


def encode_conversation(
    tokenizer,
    messages: list[dict[str, Any]],
    *,
    tools: list[dict] | None = None,
    end_ids: set[int] | None = None,
    max_length: int | None = None,
) -> Encoded:
    """Token ids of the rendered conversation and the mask of its assistant tokens: THE definition
    of what finetune-sft trains on and what eval-sft / convert-awq score.

    With `{% generation %}` tags in the chat template, the tagged tokens. Without them
    ("prefix-diff"), each assistant turn's target runs from where its generation prompt ends to
    its first end-of-turn token (`end_ids`), inclusive: the content and the end-of-turn token,
    not the header before it nor the newline after it; whatever the template writes after the
    generation prompt for that turn (Qwen3's empty think block on the last turn) is target too.
    The start is the length of `messages[:i]` rendered with `add_generation_prompt=True` when
    that is a prefix of the full rendering; when the template renders earlier turns differently
    once later ones exist (Mistral puts the system text in the last user message; Gemma 4's
    generation prompt opens an empty thought channel that history does not show), the start is
    where the turn's content begins in the full rendering, found with a sentinel content. A turn
    located neither way is left out of the mask, logged and counted in `unlocated`.

    Args:
        tools: the row's tool definitions (rendered as preprocess-sft rendered them).
        end_ids: end-of-turn token ids (`end_of_turn_ids` with the model's generation config);
            default: `end_of_turn_ids(tokenizer)`.
        max_length: keep the first `max_length` tokens (None: all).
    """
    kwargs = {"tools": tools} if tools else {}
    turns = sum(1 for m in messages if m.get("role") == "assistant")
    if has_generation_tags(tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None):
        enc = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, **kwargs
        )
        ids, mask = list(enc["input_ids"]), list(enc["assistant_masks"])
        result = Encoded(ids, mask, "generation-tags", turns, 0)
    else:
        result = _prefix_diff(tokenizer, messages, kwargs, end_of_turn_ids(tokenizer) if end_ids is None else end_ids, turns)
    if max_length is not None:
        result.input_ids, result.mask = result.input_ids[:max_length], result.mask[:max_length]
    return result


_SENTINEL = "ftpipe7f3aAssistantTurn"  # no whitespace: templates trim contents (Gemma 4)


def _prefix_diff(tokenizer, messages, kwargs, end_ids: set[int], turns: int) -> Encoded:
    full = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = enc["offset_mapping"]
    starts: list[tuple[int, int | None]] = []  # (message index, first token of its target)
    for i, message in enumerate(messages):
        if message.get("role") == "assistant":
            start = _turn_start(tokenizer, messages, i, full, kwargs)
            first = None if start is None else next((t for t, (_, e) in enumerate(offsets) if e > start), None)
            starts.append((i, first))
    mask = [0] * len(ids)
    unlocated = 0
    for n, (i, first) in enumerate(starts):
        # The end-of-turn token must come before the next assistant turn starts: a wrong end id
        # (Phi-3.5's <|endoftext|> instead of <|end|>) leaves the turn unlocated, not over-long.
        limit = next((f for _, f in starts[n + 1:] if f is not None), len(ids))
        last = None if first is None else next((t for t in range(first, limit) if ids[t] in end_ids), None)
        if last is None:
            unlocated += 1
            why = "its start is not in the full rendering" if first is None else (
                f"no end-of-turn token {sorted(end_ids)} in it")
            log.warning("assistant turn %d of a conversation cannot be located (%s): left out of the target", i, why)
            continue
        mask[first:last + 1] = [1] * (last + 1 - first)
    return Encoded(ids, mask, "prefix-diff", turns, unlocated)


def template_end_of_turn(tokenizer) -> int | None:
    """The special token the chat template writes right after an assistant turn's content (None: none)."""
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that needs another shape: no probed token
        return None
    at = text.find(_SENTINEL)
    if at < 0:
        return None
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return next((i for i, (s, _) in zip(enc["input_ids"], enc["offset_mapping"])
                 if s >= at + len(_SENTINEL) and i in special), None)


def _turn_start(tokenizer, messages, i: int, full: str, kwargs) -> int | None:
    """Character offset in `full` where assistant turn `i` starts (after its generation prompt)."""
    before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True, **kwargs) \
        if i else ""
    if i and full.startswith(before):
        return len(before)
    if not isinstance(messages[i].get("content"), str):
        return None
    probe = [*messages[:i], {**messages[i], "content": _SENTINEL}, *messages[i + 1:]]
    try:
        rendered = tokenizer.apply_chat_template(probe, tokenize=False, **kwargs)
    except Exception:  # noqa: BLE001 - the template rejects the probe: this turn is reported as unlocated
        return None
    at = rendered.find(_SENTINEL)
    if at < 0 or rendered.count(_SENTINEL) != 1 or not full.startswith(rendered[:at]):
        return None
    return at


def assistant_mask(
    tokenizer, messages: list[dict[str, Any]], max_length: int | None, *,
    tools: list[dict] | None = None, end_ids: set[int] | None = None,
) -> tuple[list[int], list[int], str]:
    """`encode_conversation` as (input_ids, mask, method).

    Returns:
        (input_ids, mask, method): method is "generation-tags" when the chat template marks
        assistant turns with `{% generation %}`, else "prefix-diff".
    """
    e = encode_conversation(tokenizer, messages, tools=tools, end_ids=end_ids, max_length=max_length)
    return e.input_ids, e.mask, e.method


def perplexity(model, tokenizer, rows, max_length: int, batch_tokens: int) -> dict[str, Any]:
    """exp(mean NLL) over assistant tokens of `rows`, in right-padded batches (use_cache=False).

    Returns:
        {"perplexity", "nll", "assistant_tokens", "val_rows", "mask_method"}; perplexity is None
        when no assistant token was found.
    """
    import torch
    import torch.nn.functional as F

    encoded, method = [], None
    end_ids = _stop_ids(model, tokenizer)
    for messages in rows:
        ids, mask, method = assistant_mask(tokenizer, messages, max_length, end_ids=end_ids)
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


def greedy_batch(model, tokenizer, prompts: list[list[int]], max_new_tokens: int,
                 batch_size: int) -> list[tuple[list[int], bool]]:
    """`greedy` for many prompts, `batch_size` at a time: left-padded batches with an attention mask
    (so each row's positions start at 0, as alone), the same stop ids and pad id as `greedy`.

    The prompts are sorted by length (longest first: a batch that does not fit in memory fails at
    once) so rows of a batch need little padding. Each row is cut after its first stop id: generate
    keeps filling a row that stopped until every row of its batch has, and those tokens are not
    the row's answer. A row that did not stop ran `max_new_tokens`, like `greedy`.

    Args:
        prompts: token ids of each prompt (chat template + generation prompt).
        batch_size: rows per generate call; 1 is `greedy` one prompt at a time.

    Returns:
        [(new token ids, stopped on an end-of-turn token)] in the order of `prompts`.

    Raises:
        ValueError: `batch_size` below 1.
    """
    import torch

    if batch_size < 1:
        raise ValueError(f"greedy_batch: batch_size must be at least 1 (got {batch_size})")
    device = next(model.parameters()).device
    stop_ids = _stop_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(stop_ids), 0)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    results: dict[int, tuple[list[int], bool]] = {}
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = len(prompts[rows[0]])
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for b, i in enumerate(rows):
            n = len(prompts[i])
            ids[b, width - n:] = torch.tensor(list(prompts[i]), dtype=torch.long)
            attention[b, width - n:] = 1
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=attention.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=sorted(stop_ids) or None,
                pad_token_id=pad_id,
            )
        for b, i in enumerate(rows):
            new = out[b, width:].tolist()
            end = next((t for t, token in enumerate(new) if token in stop_ids), None)
            results[i] = (new, False) if end is None else (new[:end + 1], True)
    return [results[i] for i in range(len(prompts))]


def generate_batch(model, tokenizer, conversations: list[list[dict[str, Any]]], max_new_tokens: int,
                   batch_size: int) -> list[tuple[str, bool, int]]:
    """`generate` for many conversations, `batch_size` at a time (`greedy_batch`).

    In float32 a padded batch can pick another token than the same prompt alone at an exact near-tie
    (the attention sums run over other shapes): `batch_size` 1 reproduces `generate`.

    Returns:
        [(text without special tokens, stopped on an end-of-turn token, number of new tokens)] in the
        order of `conversations`.
    """
    prompts = [list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"]) for messages in conversations]
    return [(tokenizer.decode(new, skip_special_tokens=True).strip(), stopped, len(new))
            for new, stopped in greedy_batch(model, tokenizer, prompts, max_new_tokens, batch_size)]


def _stop_ids(model, tokenizer) -> set[int]:
    return end_of_turn_ids(tokenizer, getattr(model, "generation_config", None))



def _completion_ids(tokenizer, prompt: list[dict[str, Any]], answer: list[dict[str, Any]],
                    max_length: int) -> tuple[list[int], int]:
    """Token ids of prompt + answer and where the answer starts (as DPOTrainer splits them)."""
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
    full = tokenizer.apply_chat_template(prompt + answer, tokenize=True, return_dict=True)["input_ids"]
    start = 0
    while start < min(len(prompt_ids), len(full)) and prompt_ids[start] == full[start]:
        start += 1
    return list(full[:max_length]), start


def preference_logps(model, tokenizer, pairs, max_length: int = 1024) -> list[tuple[float, float]]:
    """Summed log-probability of the chosen and the rejected answer of each pair.

    Args:
        model: a causal LM (a peft model scores with its active adapter).
        tokenizer: its tokenizer, with a chat template.
        pairs: {"prompt", "chosen", "rejected"} message lists (`ftpipe.handoff.pairs.read_pairs`).
        max_length: tokens kept of prompt + answer (the rest is not scored).

    Returns:
        [(chosen log-prob, rejected log-prob)] in the order of `pairs`.
    """
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for pair in pairs:
            scores = []
            for key in ("chosen", "rejected"):
                ids, start = _completion_ids(tokenizer, pair["prompt"], pair[key], max_length)
                input_ids = torch.tensor([ids], dtype=torch.long, device=device)
                logits = model(input_ids=input_ids, use_cache=False).logits[0, :-1].float()
                logps = torch.log_softmax(logits, dim=-1).gather(1, input_ids[0, 1:, None])[:, 0]
                scores.append(float(logps[max(start - 1, 0):].sum()))
            out.append((scores[0], scores[1]))
    return out


def preference_accuracy(model, tokenizer, pairs, max_length: int = 1024) -> dict[str, Any]:
    """Share of pairs whose chosen answer has the higher summed log-probability.

    Returns:
        {"accuracy", "mean_margin" (chosen - rejected log-prob, nats), "pairs"}; accuracy is None
        without pairs.
    """
    scores = preference_logps(model, tokenizer, list(pairs), max_length)
    if not scores:
        return {"accuracy": None, "mean_margin": None, "pairs": 0}
    return {
        "accuracy": sum(c > r for c, r in scores) / len(scores),
        "mean_margin": sum(c - r for c, r in scores) / len(scores),
        "pairs": len(scores),
    }
