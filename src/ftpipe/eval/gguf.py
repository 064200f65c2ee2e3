"""eval-sft's measurements of one GGUF file (export-gguf's outputs/<run>/gguf/model-<type>.gguf) with llama.cpp.

Runs in the gguf environment (llama-cpp-python + transformers), inside `python -m ftpipe.eval.worker`,
for the artifacts gguf_f16 / gguf_q8_0 / gguf_q4_k_m. Everything is measured on the token ids the HF
tokenizer (the merged model's, the one export-gguf converted) gives, handed to llama.cpp as ids, so a
GGUF's numbers differ from the merged model's only by what the conversion and quantization changed:

- perplexity on the val split over the assistant tokens (`ftpipe.handoff.measure.assistant_mask`,
  the mask finetune-sft trains on) and on the held-out text windows (`ftpipe.eval.text`), from
  llama.cpp's logits at every position (`logits_all=True`), one sequence at a time;
- the prompt checks, general checks and sample generations (`ftpipe.eval.measure.measure_answers`):
  the HF chat template with the generation prompt rendered to ids, greedy argmax decoding that
  stops at the end-of-turn ids (`ftpipe.handoff.measure.end_of_turn_ids`, with the folder's
  generation_config.json), `eval.max_new_tokens` at most, judged by `ftpipe.handoff.checks`.

No preference accuracy (the adapters' measure). numpy, llama_cpp and transformers are imported
inside the functions.

    ftpipe eval-sft --run my-run --set eval.artifacts='[merged, gguf_q8_0, gguf_q4_k_m]'
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftpipe.eval.text import text_windows
from ftpipe.handoff.measure import assistant_mask, end_of_turn_ids

if TYPE_CHECKING:
    from ftpipe.eval.spec import ArtifactSpec, EvalSpec

log = logging.getLogger(__name__)


def evaluate_gguf(art: ArtifactSpec, rows, documents: list[str], spec: EvalSpec, generations: list[dict[str, Any]]) -> dict[str, Any]:
    """Measure the GGUF file `art.model` (see the module docstring).

    Returns:
        The artifact's result, with the keys of a transformers artifact's ("perplexity", "nll",
        "assistant_tokens", "val_rows", "mask_method", the checks, "text_*"), plus "file_bytes".
    """
    from llama_cpp import Llama
    from transformers import AutoTokenizer, GenerationConfig

    from ftpipe.eval.measure import measure_answers, one_at_a_time

    tokenizer = AutoTokenizer.from_pretrained(art.tokenizer)
    try:
        generation_config = GenerationConfig.from_pretrained(art.tokenizer)
    except OSError:  # no generation_config.json: the tokenizer's EOS and the template's end-of-turn
        generation_config = None
    stop_ids = end_of_turn_ids(tokenizer, generation_config)
    encoded, method = [], None
    for messages in rows:
        ids, mask, method = assistant_mask(tokenizer, messages, spec.max_length, end_ids=stop_ids)
        if sum(mask[1:]):
            encoded.append((ids, mask))
    windows = text_windows(tokenizer, documents, spec.max_length) if documents else []
    longest = max([len(ids) for ids, _ in encoded] + [len(w) for w in windows] + [1])
    # Prompts are rendered later, one by one: room for a prompt of max_length tokens plus the answer.
    n_ctx = max(longest, spec.max_length + spec.max_new_tokens) + 8
    llm = Llama(model_path=art.model, n_ctx=n_ctx, n_batch=min(n_ctx, 2048), logits_all=True, verbose=False, seed=0,
                n_threads=max(1, min(os.cpu_count() or 1, 16)))
    try:
        nll, tokens = _score(llm, encoded)
        result: dict[str, Any] = {"status": "ok", **_perplexity(nll, tokens), "nll": nll / tokens if tokens else None,
                                  "assistant_tokens": tokens, "val_rows": len(encoded), "mask_method": method}
        if documents:
            text_nll, text_tokens = _score(llm, [(w, [1] * len(w)) for w in windows])
            result.update(text_perplexity=_perplexity(text_nll, text_tokens)["perplexity"],
                          text_nll=text_nll / text_tokens if text_tokens else None, text_tokens=text_tokens,
                          text_windows=len(windows))

        def answer(messages):
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
            new, stopped = greedy(llm, list(ids), spec.max_new_tokens, stop_ids)
            return tokenizer.decode(new, skip_special_tokens=True).strip(), stopped, len(new)

        # One prompt at a time (eval.generate_batch_size is for the transformers artifacts).
        result.update(measure_answers(one_at_a_time(answer), rows, spec, art.name, generations))
    finally:
        llm.close()
    log.info("eval %s: perplexity %s, checks %d/%d (llama.cpp)", art.name, result["perplexity"],
             result["checks_passed"], result["checks_total"])
    result["file_bytes"] = Path(art.model).stat().st_size
    return result


def _perplexity(nll: float, tokens: int) -> dict[str, float | None]:
    return {"perplexity": math.exp(min(nll / tokens, 700.0)) if tokens else None}  # capped: JSON has no inf


def _score(llm, sequences: list[tuple[list[int], list[int]]]) -> tuple[float, int]:
    """Summed NLL of the masked tokens (each predicted from the tokens before it) of each sequence, and
    how many were scored: llama.cpp's logits at every position, one sequence per evaluation."""
    import numpy as np

    total, count = 0.0, 0
    for ids, mask in sequences:
        at = np.nonzero(np.asarray(mask[1:], dtype=bool))[0]  # position t predicts ids[t + 1]
        if not len(at):
            continue
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[at], dtype=np.float64)
        top = logits.max(axis=1)
        log_z = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
        total += float((log_z - logits[np.arange(len(at)), np.asarray(ids)[at + 1]]).sum())
        count += len(at)
    return total, count


def greedy(llm, input_ids: list[int], max_new_tokens: int, stop_ids: set[int]) -> tuple[list[int], bool]:
    """Greedy (argmax) continuation of `input_ids` in llama.cpp, ending at a stop id (kept, as
    transformers' generate keeps it) or after `max_new_tokens`.

    Returns:
        (new token ids, stopped on an end-of-turn token).
    """
    import numpy as np

    llm.reset()
    llm.eval(input_ids)
    new: list[int] = []
    for _ in range(max_new_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        new.append(token)
        if token in stop_ids or llm.n_tokens >= llm.n_ctx():
            break
        llm.eval([token])
    return new, any(t in stop_ids for t in new)
