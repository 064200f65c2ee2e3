"""Preference row formats: detect which one a record is in and normalise it to one pair.

Part of `preprocess-dpo` (ftpipe/data/preprocess_dpo.py). Each normaliser turns one record into the
hand-off shape of `ftpipe.handoff.pairs`:

    {"prompt": [messages ending with a user turn],
     "chosen": [{"role": "assistant", "content": str}], "rejected": [{"role": "assistant", ...}]}

or raises `RowError(field, what)`, which the stage reports as `file:line: field: what`. Formats:
TRL (explicit or implicit prompt), LLaMA-Factory sharegpt / alpaca preference rows
(dataset_info `"ranking": true`), and a Label Studio export of a Pairwise-tag project (the
"Human Preference collection for RLHF" template: `data.prompt`, `data.answer1`, `data.answer2`
and a result `{"type": "pairwise", "value": {"selected": "left" | "right"}}`, left = answer1).

    ftpipe preprocess-dpo --config config.yaml --format sharegpt
"""

from __future__ import annotations

import json
from typing import Any, Callable

from ftpipe.data import label_studio
from ftpipe.data.formats import (SHAREGPT_ROLES, RowError, alpaca_prompt, content_text, json_type, message_objects,
                                 need_object, string_field)

FORMATS = ("trl", "sharegpt", "alpaca", "label_studio")
PROMPT_ROLES = ("system", "user", "assistant")
JSON_CELLS = ("prompt", "chosen", "rejected", "conversations")  # CSV / Parquet cells that may hold JSON


def detect(record: Any, container: str) -> str | None:
    """The preference format a record looks like, or None.

    Args:
        record: the first valid record of the file.
        container: `json`, `jsonl`, `csv` or `parquet` (a Label Studio export is one JSON array).
    """
    if container == "json" and label_studio.is_export(record):
        return "label_studio"
    if not isinstance(record, dict) or "chosen" not in record or "rejected" not in record:
        return None
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record:
        return "alpaca"
    return "trl"


def normaliser(fmt: str, ls_cfg) -> Callable[[Any], dict]:
    """The function turning one record of format `fmt` into a pair (`ls_cfg`: preference.label_studio)."""
    if fmt == "label_studio":
        return lambda record: normalise_pairwise_task(record, ls_cfg)
    return {"trl": normalise_trl, "sharegpt": normalise_sharegpt, "alpaca": normalise_alpaca}[fmt]


def json_cells(record: Any) -> Any:
    """A CSV / Parquet record with its JSON cells decoded: a `prompt`, `chosen`, `rejected` or
    `conversations` cell holding a JSON list of messages (or a sharegpt `{"from", "value"}` turn)
    becomes that list (turn); any other text, even one that starts with `[`, stays text."""
    if not isinstance(record, dict):
        return record
    out = dict(record)
    for key in JSON_CELLS:
        value = out.get(key)
        if not isinstance(value, str) or value.lstrip()[:1] not in ("[", "{"):
            continue
        try:
            decoded = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(decoded, list) and decoded and all(isinstance(m, dict) for m in decoded):
            out[key] = decoded
        elif isinstance(decoded, dict) and ("from" in decoded or "role" in decoded):
            out[key] = decoded
    return out


def _messages(raw: Any, field: str) -> list[dict]:
    """A list of {role, content} messages (system, user, assistant; text content only)."""
    messages = []
    for where, msg, role in message_objects(raw, field, PROMPT_ROLES, " (preference pairs hold no tool turns)"):
        if msg.get("tool_calls"):
            raise RowError(f"{where}.tool_calls", "preference pairs hold no tool calls")
        if msg.get("content") is None:
            raise RowError(f"{where}.content", "missing")
        messages.append({"role": role, "content": content_text(msg["content"], f"{where}.content")})
    return messages


def _ends_with_user(prompt: list[dict], field: str) -> list[dict]:
    if prompt[-1]["role"] != "user":
        raise RowError(field, f"the prompt must end with a user turn, not {prompt[-1]['role']}")
    return prompt


def _answer(value: Any, field: str) -> list[dict]:
    """A string, or a list of exactly one assistant message -> [one assistant message]."""
    if value is None:
        raise RowError(field, "missing")
    if isinstance(value, str):
        messages = [{"role": "assistant", "content": value}]
    elif isinstance(value, list):
        messages = _messages(value, field)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise RowError(field, f"expected exactly one assistant message, got {_roles(messages)}")
    else:
        raise RowError(field, f"expected a string or a list of messages, got {json_type(value)}")
    if not messages[0]["content"].strip():
        raise RowError(field, "empty answer")
    return messages


def _roles(messages: list[dict]) -> str:
    if not messages:
        return "none"
    return f"{len(messages)} message{'s' if len(messages) > 1 else ''} ({', '.join(m['role'] for m in messages)})"


def _pair(prompt: list[dict], chosen: list[dict], rejected: list[dict]) -> dict:
    if chosen[0]["content"] == rejected[0]["content"]:
        raise RowError("chosen", "the same text as rejected: nothing to prefer", reason="identical")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def normalise_trl(record: Any) -> dict:
    """TRL preference rows: `prompt` (string or messages) + `chosen` / `rejected` (string or one
    assistant message), or, without a prompt, `chosen` / `rejected` as whole conversations whose
    shared turns up to the last shared user turn are the prompt."""
    record = need_object(record)
    prompt = record.get("prompt")
    if prompt is None:
        return _implicit(record)
    if isinstance(prompt, str):
        if not prompt.strip():
            raise RowError("prompt", "empty")
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list):
        messages = _ends_with_user(_messages(prompt, "prompt"), "prompt")
    else:
        raise RowError("prompt", f"expected a string or a list of messages, got {json_type(prompt)}")
    return _pair(messages, _answer(record.get("chosen"), "chosen"), _answer(record.get("rejected"), "rejected"))


def _implicit(record: dict) -> dict:
    for key in ("chosen", "rejected"):
        if isinstance(record.get(key), str):
            raise RowError("prompt", f"missing: a text {key} needs a prompt (without one, chosen and rejected are "
                           "whole conversations sharing the prompt turns)")
    chosen, rejected = _messages(record.get("chosen"), "chosen"), _messages(record.get("rejected"), "rejected")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    users = [i for i in range(shared) if chosen[i]["role"] == "user"]
    if not users:
        raise RowError("chosen", "no shared prompt: chosen and rejected must start with the same turns, "
                       "up to a user turn")
    cut = users[-1] + 1
    for key, messages in (("chosen", chosen), ("rejected", rejected)):
        answer = messages[cut:]
        if len(answer) != 1 or answer[0]["role"] != "assistant":
            raise RowError(key, f"after the shared prompt ({cut} turns) expected exactly one assistant message, "
                           f"got {_roles(answer)}")
        if not answer[0]["content"].strip():
            raise RowError(f"{key}[{cut}].content", "empty answer")
    return _pair(chosen[:cut], chosen[cut:], rejected[cut:])


def _sharegpt_turn(turn: Any, where: str) -> dict:
    if not isinstance(turn, dict):
        raise RowError(where, f"expected an object with from and value, got {json_type(turn)}")
    speaker = turn.get("from")
    if speaker is None:
        raise RowError(f"{where}.from", "missing")
    role = SHAREGPT_ROLES.get(str(speaker).lower())
    if role not in PROMPT_ROLES or str(speaker).lower() == "function_call":
        raise RowError(f"{where}.from", f"{speaker!r} is not one of human, gpt, system (or user, assistant)")
    if turn.get("value") is None:
        raise RowError(f"{where}.value", "missing")
    return {"role": role, "content": content_text(turn["value"], f"{where}.value")}


def normalise_sharegpt(record: Any) -> dict:
    """LLaMA-Factory sharegpt preference rows: `conversations` (ending with a human turn), `chosen` and
    `rejected` as one gpt turn `{"from": "gpt", "value": ...}` each; optional `system`."""
    record = need_object(record)
    raw = record.get("conversations")
    if raw is None:
        raise RowError("conversations", "missing")
    if not isinstance(raw, list) or not raw:
        raise RowError("conversations", "expected a non-empty list of {from, value} turns")
    prompt = []
    system = string_field(record, "system", required=False)
    if system:
        prompt.append({"role": "system", "content": system})
    prompt += [_sharegpt_turn(turn, f"conversations[{i}]") for i, turn in enumerate(raw)]
    _ends_with_user(prompt, "conversations")
    answers = []
    for key in ("chosen", "rejected"):
        if record.get(key) is None:
            raise RowError(key, "missing")
        if isinstance(record[key], str):  # some exports keep only the answer text
            turn = {"role": "assistant", "content": record[key]}
        else:
            turn = _sharegpt_turn(record[key], key)
        if turn["role"] != "assistant":
            raise RowError(f"{key}.from", f"expected the assistant (gpt), got {record[key].get('from')!r}")
        if not turn["content"].strip():
            raise RowError(f"{key}.value", "empty answer")
        answers.append([turn])
    return _pair(prompt, *answers)


def normalise_alpaca(record: Any) -> dict:
    """LLaMA-Factory alpaca preference rows: `instruction` (+ `input`) -> the user turn, `chosen` /
    `rejected` strings; optional `system` and `history` ([user, assistant] pairs before it)."""
    prompt = alpaca_prompt(need_object(record))
    chosen = [{"role": "assistant", "content": string_field(record, "chosen")}]
    rejected = [{"role": "assistant", "content": string_field(record, "rejected")}]
    return _pair(prompt, chosen, rejected)


def normalise_pairwise_task(task: Any, cfg) -> dict:
    """One task of a Label Studio export of a Pairwise project -> a pair.

    Args:
        task: one element of the export: `{"data": {prompt, answer1, answer2}, "annotations": [...]}`.
        cfg: `preference.label_studio` (field names, from_name, which annotation).

    Raises:
        RowError: no usable annotation (reason `no_annotation`: not annotated, or every annotation
            cancelled), or a missing prompt / answer / pairwise choice.
    """
    if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
        raise RowError("data", "missing: not a Label Studio task")
    data = task["data"]
    texts = {}
    for field in (cfg.prompt_field, cfg.left_field, cfg.right_field):
        value = data.get(field)
        if not isinstance(value, str) or not value.strip():
            raise RowError(f"data.{field}", "missing" if value is None else "expected a non-empty string")
        texts[field] = value
    annotations = task.get("annotations") or []
    if not isinstance(annotations, list):
        raise RowError("annotations", "expected a list")
    chosen_one = label_studio.choose_annotation(annotations, cfg.annotation)
    if chosen_one is None:
        what = f"all {len(annotations)} annotations cancelled" if annotations else "no annotations"
        raise RowError("annotations", what, reason="no_annotation")
    index, annotation = chosen_one
    result = annotation.get("result") or []
    found = None
    for j, item in enumerate(result if isinstance(result, list) else []):
        if isinstance(item, dict) and item.get("type") == "pairwise" and (
                cfg.from_name is None or item.get("from_name") == cfg.from_name):
            found = j, item
            break
    if found is None:
        wanted = f"from_name {cfg.from_name!r}" if cfg.from_name else "a Pairwise tag"
        raise RowError(f"annotations[{index}].result", f"no pairwise result ({wanted})")
    j, item = found
    value = item.get("value")
    selected = value.get("selected") if isinstance(value, dict) else None
    if selected not in ("left", "right"):
        raise RowError(f"annotations[{index}].result[{j}].value.selected", f"expected 'left' or 'right', got {selected!r}")
    left, right = texts[cfg.left_field], texts[cfg.right_field]
    chosen, rejected = (left, right) if selected == "left" else (right, left)
    prompt = []
    if isinstance(data.get("system"), str) and data["system"].strip():
        prompt.append({"role": "system", "content": data["system"]})
    prompt.append({"role": "user", "content": texts[cfg.prompt_field]})
    return _pair(prompt, [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}])
