"""Helpers of `convert-awq`: calibration rows, greedy agreement, sizes, pre-flight sizes.

Used by `ftpipe.export.convert_awq` (the stage); perplexity and greedy decoding are the shared
ones of `ftpipe.handoff.measure`. torch and transformers are imported inside functions.

    ftpipe convert-awq --config debug_config.yaml --run my-run
"""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def render(tokenizer, messages: list[dict[str, Any]], max_length: int, add_generation_prompt: bool = False) -> list[int]:
    """Token ids of a conversation rendered with the model's chat template, cut to `max_length`."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    # The template already holds every special token the model was trained with.
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[:max_length]


def calibration_dataset(tokenizer, rows: list[list[dict[str, Any]]], count: int, max_length: int, seed: int):
    """A tokenized `datasets.Dataset` of `count` conversations sampled (seeded) from the train split.

    llm-compressor uses a dataset that already has `input_ids` as is (no re-tokenization).
    """
    from datasets import Dataset

    picked = random.Random(seed).sample(rows, min(count, len(rows)))
    ids = [render(tokenizer, messages, max_length) for messages in picked]
    ids = [x for x in ids if len(x) > 1]
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]})


def agreement(reference: list[list[int]], candidate: list[list[int]]) -> dict[str, float]:
    """Greedy agreement: share of identical continuations, and of positions holding the same token."""
    exact = sum(a == b for a, b in zip(reference, candidate))
    same = total = 0
    for a, b in zip(reference, candidate):
        length = max(len(a), len(b))
        same += sum(x == y for x, y in zip(a, b))
        total += length
    return {
        "greedy_exact_match": exact / max(len(reference), 1),
        "greedy_token_agreement": same / max(total, 1),
    }


def safetensors_bytes(folder: Path) -> int:
    """Bytes of the weight files (*.safetensors) in a model folder."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def fp16_bytes(folder: Path) -> int:
    """Size of a model folder's weights at 2 bytes per stored element (tied weights counted once)."""
    from safetensors import safe_open

    elements = 0
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():
                shape = fh.get_slice(name).get_shape()
                elements += math.prod(shape)
    return 2 * elements


# Architectures with their own AWQ smoothing mappings in llm-compressor (AWQ_MAPPING_REGISTRY of
# llmcompressor.modifiers.transform.awq.mappings, in the version the awq lock pins; tests/export/
# test_families_export.py checks this list against the installed library). For any other
# architecture llm-compressor silently falls back to Llama's mappings, which smooth the wrong norms
# where a layer is built differently: Gemma 4's post_attention_layernorm normalises the attention
# output, not the MLP input. Checked by convert-awq's `check` (which imports no llm-compressor).
AWQ_ARCHITECTURES = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM",
    "Gemma2ForCausalLM", "Gemma3ForCausalLM", "GraniteForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM",
})


def awq_architectures() -> frozenset[str]:
    """Architectures llm-compressor has AWQ mappings for: its registries when importable, else the
    list above. Imports llm-compressor: not for a stage's `check`."""
    import importlib.util

    if importlib.util.find_spec("llmcompressor") is None:
        return AWQ_ARCHITECTURES
    from llmcompressor.modifiers.transform.awq.dynamic_mappings import AWQ_DYNAMIC_MAPPING_REGISTRY
    from llmcompressor.modifiers.transform.awq.mappings import AWQ_MAPPING_REGISTRY

    return frozenset(AWQ_MAPPING_REGISTRY) | frozenset(AWQ_DYNAMIC_MAPPING_REGISTRY)


def unmapped_architectures(config_path: Path, known: frozenset[str] = AWQ_ARCHITECTURES) -> list[str]:
    """The architectures of a model config.json that are not in `known` (default: the list above;
    `awq_architectures()` asks llm-compressor)."""
    data = json.loads(config_path.read_text(encoding="utf-8"))
    return [a for a in data.get("architectures") or ["(none in config.json)"] if a not in known]


def size_problems(config_path: Path, group_size: int) -> list[str]:
    """Linear input sizes of a model config.json that are not multiples of `group_size`.

    Group quantization splits every Linear layer's input dimension into groups: the hidden size
    (q/k/v/gate/up), the attention output width (o_proj) and the MLP size (down_proj).
    """
    data = json.loads(config_path.read_text(encoding="utf-8"))
    data = data.get("text_config") or data
    hidden = data.get("hidden_size")
    heads = data.get("num_attention_heads")
    head_dim = data.get("head_dim") or (hidden // heads if hidden and heads else None)
    sizes = {
        "hidden_size": hidden,
        "intermediate_size": data.get("intermediate_size"),
        "num_attention_heads*head_dim": heads * head_dim if heads and head_dim else None,
    }
    return [
        f"{name} = {value} is not a multiple of awq.group_size = {group_size}"
        for name, value in sizes.items()
        if isinstance(value, int) and value % group_size
    ]
