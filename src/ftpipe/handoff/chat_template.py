"""What the stages must agree on about a model's chat template and tokenizer, each found one way.

- `tool_support`: whether the chat template renders tool definitions and tool calls
  (preprocess-sft refuses tool rows it would drop; check-template adds a tool conversation);
- `adds_bos`: whether the tokenizer puts BOS in front when it encodes text (make-tiny-model writes
  it into tokenizer_config.json; check-template's llama.cpp and Ollama rows follow it);
- `generation_eos_ids`: the ids of a model folder's generation_config.json `eos_token_id`
  (export-gguf's end-of-generation check, ollama-load's stops).

Nothing heavy is imported.
"""

from __future__ import annotations

import json
from pathlib import Path

_TOOL_NAME, _TOOL_ARG, _TOOL_RESULT = "ftpipe_probe_tool_5e1c", "ftpipe_probe_arg_9b2d", "ftpipe_probe_result_47af"


def tool_support(tokenizer) -> dict[str, bool]:
    """Whether the chat template renders tool definitions (`tools`) and tool calls with their results.

    Found by rendering probes with sentinel names (as trl.chat_template_utils.supports_tool_calling):
    a template that raises on them, or drops a sentinel, does not support that part.
    """
    calls = [{"role": "user", "content": "hi"},
             {"role": "assistant", "content": "", "tool_calls": [
                 {"id": "a1b2c3d4e", "type": "function",  # 9 alphanumerics: Mistral's templates demand them
                  "function": {"name": _TOOL_NAME, "arguments": {_TOOL_ARG: "1"}}}]},
             {"role": "tool", "name": _TOOL_NAME, "tool_call_id": "a1b2c3d4e", "content": _TOOL_RESULT}]
    definition = [{"type": "function", "function": {
        "name": _TOOL_NAME, "description": "probe",
        "parameters": {"type": "object", "properties": {_TOOL_ARG: {"type": "string"}}}}}]

    def renders(messages, tools, sentinels) -> bool:
        try:
            text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
        except Exception:  # noqa: BLE001 - a template that rejects the probe does not support it
            return False
        return all(s in text for s in sentinels)

    return {
        "tools": renders([{"role": "user", "content": "hi"}], definition, (_TOOL_NAME, _TOOL_ARG)),
        "tool_calls": renders(calls, None, (_TOOL_NAME, _TOOL_ARG, _TOOL_RESULT)),
    }


def adds_bos(tokenizer) -> bool:
    """Whether encoding text with special tokens puts the tokenizer's BOS first (transformers 5's
    `add_bos_token` attribute does not say it reliably: the post-processor decides)."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos is not None and bool(ids) and ids[0] == bos


def generation_eos_ids(model_dir: Path) -> list[int]:
    """`eos_token_id` of `model_dir/generation_config.json` as a list, in its order ([] without one)."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return []
    ids = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    return [ids] if isinstance(ids, int) else [i for i in ids or [] if isinstance(i, int)]
