"""Row formats: detect which one a record is in and normalise it to chat messages.

Part of `preprocess-sft` (ftpipe/data/preprocess_sft.py): every reader yields plain dict records; the
functions here turn one record into `{"messages": [...]}` (plus `tools` when the row has tool
definitions) or raise `RowError(field, what)`, which the stage reports as
`file:line: field: what is wrong`.

    ftpipe preprocess-sft --config debug_config.yaml --format alpaca
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterator

ROLES = ("system", "user", "assistant", "tool")
# ShareGPT speaker names (incl. the LLaMA-Factory variants) -> chat roles.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
    "system": "system",
    "tool": "tool",
    "observation": "tool",
    "function": "tool",
    "function_call": "assistant",
}
ROW_FORMATS = ("alpaca", "messages", "sharegpt", "prompt_completion", "text")


class RowError(Exception):
    """One bad record: which field and what is wrong with it (the caller adds file:line)."""

    def __init__(self, field: str, what: str, reason: str = "invalid") -> None:
        super().__init__(f"{field}: {what}")
        self.field = field
        self.what = what
        self.reason = reason

    def __reduce__(self):  # pickled whole: preprocess workers send row errors back to the main process
        return (RowError, (self.field, self.what, self.reason))


def detect_row_format(record: Any) -> str | None:
    """The row format a record looks like, or None.

    Checked in order: messages, conversations (ShareGPT), instruction+output (alpaca),
    prompt+completion, text.
    """
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    return None


def describe_keys(record: Any) -> str:
    """Short description of a record's keys for 'cannot detect' messages."""
    if not isinstance(record, dict):
        return f"a JSON {json_type(record)}, not an object"
    keys = ", ".join(sorted(map(str, record))[:8]) or "no keys"
    return f"keys {keys}"


def json_type(value: Any) -> str:
    """The JSON name of a decoded value's type ("object", "array", ...), for error messages."""
    return {
        dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
        float: "number", type(None): "null",
    }.get(type(value), type(value).__name__)


def string_field(record: dict, key: str, field: str | None = None, required: bool = True) -> str | None:
    """`record[key]` as a string (None when absent and not `required`).

    Raises:
        RowError: missing, empty or not a string, naming `field` (default: `key`).
    """
    field = field or key
    if key not in record or record[key] is None:
        if required:
            raise RowError(field, "missing")
        return None
    value = record[key]
    if not isinstance(value, str):
        raise RowError(field, f"expected a string, got {json_type(value)}")
    if required and not value.strip():
        raise RowError(field, "empty")
    return value


def need_object(record: Any) -> dict:
    """`record` when it is a JSON object; otherwise a `RowError` for the whole row."""
    if not isinstance(record, dict):
        raise RowError("<row>", f"expected a JSON object, got {json_type(record)}")
    return record


def content_text(value: Any, field: str) -> str:
    """Message content: a string, or a list of text parts joined (OpenAI `{"type": "text", "text"}`,
    LLaMA-Factory `{"type": "text", "value"}`)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            text = part.get("text", part.get("value")) if isinstance(part, dict) and part.get("type") == "text" else None
            if not isinstance(text, str):
                kind = part.get("type") if isinstance(part, dict) else None
                what = f"a {kind!r} part: " if isinstance(kind, str) and kind != "text" else ""
                raise RowError(f"{field}[{j}]", what + "only text parts ({\"type\": \"text\", \"text\" or \"value\": ...}) are supported")
            texts.append(text)
        return "".join(texts)
    raise RowError(field, f"expected a string, got {json_type(value)}")


def _tool_calls(value: Any, field: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise RowError(field, "expected a non-empty list of tool calls")
    for j, call in enumerate(value):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RowError(f"{field}[{j}].function.name", "missing")
        args = fn.get("arguments")
        if not isinstance(args, (str, dict)):
            raise RowError(f"{field}[{j}].function.arguments", "expected a JSON string or an object")
    return value


def _check_conversation(messages: list[dict], field: str) -> list[dict]:
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError(field, "no assistant message: nothing to learn from this row")
    return messages


_ROLE_SET = frozenset(ROLES)


def is_plain_messages(record: Any) -> bool:
    """True for the common case, a valid row already in output form: `{"messages": [...]}` with
    only role/content string pairs and an assistant turn (checked fast, without copying)."""
    raw = record.get("messages") if type(record) is dict and len(record) == 1 else None
    if type(raw) is not list or not raw:
        return False
    assistant = False
    for m in raw:
        if type(m) is not dict or len(m) != 2 or type(m.get("content")) is not str or type(m.get("role")) is not str or m["role"] not in _ROLE_SET:
            return False
        assistant = assistant or m["role"] == "assistant"
    return assistant


def normalise_messages(record: Any, field: str = "messages") -> dict:
    """OpenAI-style `{"messages": [{"role", "content", ...}]}` (tool calls and `tools` kept)."""
    if field == "messages" and is_plain_messages(record):
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in record["messages"]]}
    record = need_object(record)
    row: dict[str, Any] = {"messages": _check_conversation(_message_list(record.get(field), field), field)}
    if record.get("tools") is not None:
        if not isinstance(record["tools"], list):
            raise RowError("tools", f"expected a list of tool definitions, got {json_type(record['tools'])}")
        row["tools"] = record["tools"]
    return row


def message_objects(raw: Any, field: str, roles: tuple[str, ...] = ROLES, why: str = "") -> Iterator[tuple[str, dict, str]]:
    """`(where, message, role)` for each message of a non-empty list whose items are objects with a
    role among `roles` (SFT rows and preference pairs check their lists alike).

    Raises:
        RowError: the list is missing or empty, an item is not an object, a role is missing or not
            allowed (`why` is appended to that message), naming `field[i]`.
    """
    if raw is None:
        raise RowError(field, "missing")
    if not isinstance(raw, list) or not raw:
        raise RowError(field, f"expected a non-empty list of messages, got {json_type(raw) if raw != [] else 'an empty list'}")
    for i, msg in enumerate(raw):
        where = f"{field}[{i}]"
        if not isinstance(msg, dict):
            raise RowError(where, f"expected an object with role and content, got {json_type(msg)}")
        role = msg.get("role")
        if role is None:
            raise RowError(f"{where}.role", "missing")
        if role not in roles:
            raise RowError(f"{where}.role", f"{role!r} is not one of {', '.join(roles)}{why}")
        yield where, msg, role


def _message_list(raw: Any, field: str) -> list[dict]:
    messages = []
    for where, msg, role in message_objects(raw, field):
        out: dict[str, Any] = {"role": role}
        content = msg.get("content")
        if "tool_calls" in msg and msg["tool_calls"] is not None:
            if role != "assistant":
                raise RowError(f"{where}.tool_calls", f"only assistant messages carry tool calls, not {role}")
            out["content"] = "" if content is None else content_text(content, f"{where}.content")
            out["tool_calls"] = _tool_calls(msg["tool_calls"], f"{where}.tool_calls")
        else:
            if content is None:
                raise RowError(f"{where}.content", "missing")
            out["content"] = content_text(content, f"{where}.content")
        for key in ("name", "tool_call_id"):
            if msg.get(key) is not None:
                if not isinstance(msg[key], str):
                    raise RowError(f"{where}.{key}", f"expected a string, got {json_type(msg[key])}")
                out[key] = msg[key]
        messages.append(out)
    return messages


def normalise_alpaca(record: Any) -> dict:
    """Alpaca: instruction (+ input) -> user, output -> assistant; optional system and history."""
    record = need_object(record)
    messages = alpaca_prompt(record)
    messages.append({"role": "assistant", "content": string_field(record, "output")})
    return {"messages": messages}


def alpaca_prompt(record: dict) -> list[dict]:
    """The prompt of an alpaca row (SFT or preference): `system`, then `history` ([user, assistant]
    pairs), then `instruction` (+ `input`) as the user turn.

    Raises:
        RowError: a missing or non-string instruction, a bad system / input / history, naming the key.
    """
    instruction = string_field(record, "instruction")
    extra = string_field(record, "input", required=False)
    system = string_field(record, "system", required=False)
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    history = record.get("history")
    if history is not None:
        if not isinstance(history, list):
            raise RowError("history", f"expected a list of (user, assistant) pairs, got {json_type(history)}")
        for i, pair in enumerate(history):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise RowError(f"history[{i}]", "expected a (user, assistant) pair of strings")
            messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    messages.append({"role": "user", "content": f"{instruction}\n{extra}" if extra else instruction})
    return messages


def sharegpt_roles(tags) -> dict[str, str]:
    """Speaker name -> role ("function_call" for tool calls) for `data.tags` (LLaMA-Factory `tags`)."""
    return {
        tags.user_tag: "user", tags.assistant_tag: "assistant", tags.observation_tag: "tool",
        tags.function_tag: "function_call", tags.system_tag: "system",
    }


def normalise_sharegpt(record: Any, tags=None) -> dict:
    """ShareGPT: `conversations` of {from, value}; human/gpt/system/tool (and function_call).

    With `tags` (`data.tags`): turns use `tags.role_tag` / `tags.content_tag` keys and exactly the
    speaker names the tags give (as LLaMA-Factory reads them).
    """
    record = need_object(record)
    role_key, value_key = (tags.role_tag, tags.content_tag) if tags is not None else ("from", "value")
    roles = sharegpt_roles(tags) if tags is not None else None
    raw = record.get("conversations")
    if raw is None:
        raise RowError("conversations", "missing")
    if not isinstance(raw, list) or not raw:
        raise RowError("conversations", "expected a non-empty list of {from, value} turns")
    messages: list[dict] = []
    system = string_field(record, "system", required=False)
    if system:
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(raw):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise RowError(where, f"expected an object with {role_key} and {value_key}, got {json_type(turn)}")
        speaker = turn.get(role_key)
        if speaker is None:
            raise RowError(f"{where}.{role_key}", "missing")
        if roles is None:
            role = SHAREGPT_ROLES.get(str(speaker).lower())
            if role is None:
                raise RowError(f"{where}.from", f"{speaker!r} is not one of human, gpt, system, tool (or user, assistant, observation, function_call)")
            if str(speaker).lower() == "function_call":
                role = "function_call"
        else:
            role = roles.get(speaker)
            if role is None:
                raise RowError(f"{where}.{role_key}", f"{speaker!r} is not one of the data.tags speakers {', '.join(map(repr, roles))}")
        value = turn.get(value_key)
        if value is None:
            raise RowError(f"{where}.{value_key}", "missing")
        value = content_text(value, f"{where}.{value_key}")
        if role == "function_call":
            try:
                call = json.loads(value)
            except (json.JSONDecodeError, RecursionError):
                raise RowError(f"{where}.{value_key}", "a function_call value must be JSON {\"name\", \"arguments\"}") from None
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                raise RowError(f"{where}.{value_key}", "a function_call value must be JSON {\"name\", \"arguments\"}")
            args = call.get("arguments", {})
            messages.append({
                "role": "assistant", "content": "",
                "tool_calls": [{"type": "function", "function": {"name": call["name"], "arguments": args}}],
            })
        else:
            messages.append({"role": role, "content": value})
    row: dict[str, Any] = {"messages": _check_conversation(messages, "conversations")}
    if record.get("tools") is not None:
        tools = record["tools"]
        if isinstance(tools, str):  # LLaMA-Factory stores tool definitions as a JSON string
            try:
                tools = json.loads(tools)
            except (json.JSONDecodeError, RecursionError):
                raise RowError("tools", "not valid JSON") from None
        if not isinstance(tools, list):
            raise RowError("tools", f"expected a list of tool definitions, got {json_type(tools)}")
        row["tools"] = tools
    return row


def normalise_prompt_completion(record: Any) -> dict:
    """prompt -> user, completion -> assistant (strings, or conversational lists of messages)."""
    record = need_object(record)
    prompt, completion = record.get("prompt"), record.get("completion")
    if isinstance(prompt, list) or isinstance(completion, list):
        if not isinstance(prompt, list):
            raise RowError("prompt", "expected a list of messages like completion")
        if not isinstance(completion, list):
            raise RowError("completion", "expected a list of messages like prompt")
        messages = _message_list(prompt, "prompt") + _message_list(completion, "completion")
        return {"messages": _check_conversation(messages, "completion")}
    prompt = string_field(record, "prompt")
    completion = string_field(record, "completion")
    messages = []
    system = string_field(record, "system", required=False)
    if system:
        messages.append({"role": "system", "content": system})
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    return {"messages": messages}


def normalise_text(record: Any) -> dict:
    """Plain `text` -> one assistant message (the whole text is the training target)."""
    record = need_object(record)
    return {"messages": [{"role": "assistant", "content": string_field(record, "text")}]}


NORMALISERS: dict[str, Callable[[Any], dict]] = {
    "alpaca": normalise_alpaca,
    "messages": normalise_messages,
    "sharegpt": normalise_sharegpt,
    "prompt_completion": normalise_prompt_completion,
    "text": normalise_text,
}

# The keys that identify each row format: used to say "this looks like X, not Y".
REQUIRED_KEYS = {
    "alpaca": "instruction, output",
    "messages": "messages",
    "sharegpt": "conversations",
    "prompt_completion": "prompt, completion",
    "text": "text",
}
