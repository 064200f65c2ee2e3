"""The prepared split as every stage reads it, and the one meaning of "the prompt".

`preprocess-sft` writes prepared/<dataset>/train.jsonl and val.jsonl, one `{"messages": [...]}`
row per line. finetune-sft, export-merged, convert-awq, export-gguf, ollama-load, eval-sft and
smoke-test read them through `read_split` (streaming, with the same errors everywhere), and cut a
conversation into what a model is asked with `prompt`: every turn before the last assistant turn.
Only the standard library and `ftpipe.core` are imported (the awq environment's eval worker
imports it too).

    ftpipe preprocess-sft --config debug_config.yaml
"""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from ftpipe.core.errors import InputError

if TYPE_CHECKING:
    from ftpipe.core.runs import Project

Messages = list[dict[str, Any]]

PRODUCE = "ftpipe preprocess-sft"
REDO = "ftpipe preprocess-sft --force"
CHAT_ROLES = ("system", "user", "assistant")

# Conversations used to verify artifacts when the run has no prepared split.
FALLBACK_CONVERSATIONS: list[Messages] = [
    [{"role": role, "content": content} for role, content in turns]
    for turns in (
        (("system", "You are a helpful assistant."), ("user", "What is the capital of France?"), ("assistant", "Paris.")),
        (("user", "Label the review: a wonderful, moving film."), ("assistant", "positive")),
        (("user", "Write one sentence about the sea."), ("assistant", "The sea is wide and blue.")),
        (("system", "Answer briefly."), ("user", "Name a prime number."), ("assistant", "Seven."),
         ("user", "And another one?"), ("assistant", "Eleven.")),
    )
]


def read_split(path: Path, limit: int | None = None) -> Iterator[Messages]:
    """The conversations of a prepared split, one row at a time.

    Args:
        path: prepared/<dataset>/train.jsonl or val.jsonl.
        limit: stop after this many conversations (None: all).

    Returns:
        An iterator over each row's `messages` list as written (other row keys dropped).

    Raises:
        InputError: the file is missing (now); a line is not a `{"messages": [...]}` row (while
            iterating), naming `file:line`.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: prepared split not found", hint=PRODUCE)
    return (row["messages"] for row in _rows(path, limit))


def read_chat_rows(path: Path) -> list[dict[str, Any]]:
    """Every row of a split as finetune-sft trains on it: `messages` as written (tool calls kept)
    and the row's `tools` when it has any.

    Raises:
        InputError: as `read_split`.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: prepared split not found", hint=PRODUCE)
    return [{"messages": row["messages"], **({"tools": row["tools"]} if row.get("tools") else {})}
            for row in _rows(path, None)]


def json_lines(path: Path, redo: str) -> Iterator[tuple[int, Any]]:
    """`(line number, decoded value)` of each non-blank line of a JSONL file a stage wrote.

    Raises:
        InputError: a line is not UTF-8 or not JSON, naming `file:line`, with `redo` (the command
            that writes the file again) as the hint.
    """
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError(f"{path}:{number}: not UTF-8 text", hint=redo) from None
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{number}: invalid JSON ({exc.msg})", hint=redo) from None


def _rows(path: Path, limit: int | None) -> Iterator[dict[str, Any]]:
    if limit is not None and limit <= 0:
        return
    count = 0
    for number, row in json_lines(path, REDO):
        messages = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(messages, list) or not messages:
            raise InputError(f"{path}:{number}: expected {{\"messages\": [...]}} with a non-empty list", hint=REDO)
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise InputError(f"{path}:{number}: messages[{i}]: expected an object with a string `role`", hint=REDO)
        yield row
        count += 1
        if limit is not None and count >= limit:
            return


def _last_assistant(messages: Messages) -> int | None:
    return max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)


def prompt(messages: Messages) -> Messages:
    """The prompt of a conversation: every turn before its last assistant turn.

    A conversation without an assistant turn is all prompt. Generation continues it with the
    chat template's generation prompt; the cut-off assistant turn is the reference answer.
    """
    last = _last_assistant(messages)
    return list(messages if last is None else messages[:last])


def reference(messages: Messages) -> str | None:
    """The content of the last assistant turn (the answer to `prompt(messages)`), None without one."""
    last = _last_assistant(messages)
    return None if last is None else messages[last].get("content") or ""


def plain(messages: Messages, roles: tuple[str, ...] | None = None) -> Messages:
    """Role and content only (content None -> ""), optionally keeping only turns of `roles`."""
    return [
        {"role": m["role"], "content": m.get("content") or ""}
        for m in messages
        if roles is None or m["role"] in roles
    ]


def read_training_rows(path: Path) -> list[dict[str, Messages]]:
    """Every row of a split as `{"messages": [...]}` with role and content only (what TRL trains on).

    Raises:
        InputError: as `read_split`.
    """
    return [{"messages": plain(messages)} for messages in read_split(path)]


def answerable(path: Path, limit: int, roles: tuple[str, ...] | None = None) -> list[Messages]:
    """The first `limit` conversations of a split whose prompt has a user turn (role + content only).

    Args:
        roles: keep only turns of these roles (e.g. `CHAT_ROLES` drops tool turns).

    Raises:
        InputError: as `read_split`.
    """
    plain_rows = (plain(messages, roles) for messages in read_split(path))
    usable = (m for m in plain_rows if any(turn["role"] == "user" for turn in prompt(m)))
    return list(islice(usable, limit))


def split_prompts(path: Path, limit: int) -> list[Messages]:
    """The prompts of the first `limit` answerable conversations of a split (smoke-test asks them).

    Raises:
        InputError: the file is missing or bad (as `read_split`), or no conversation has a user turn.
    """
    prompts = [prompt(messages) for messages in answerable(path, limit)]
    if not prompts:
        raise InputError(f"{path}: no conversation with a user turn", hint=REDO)
    return prompts


def sample_conversations(project: Project, dataset: str, n: int) -> tuple[list[Messages], str]:
    """Up to `n` conversations of the prepared val split (else train), else built-in ones.

    Tool turns are dropped (system, user and assistant turns kept, role and content only).

    Returns:
        (conversations, source) where source names the file used or "built-in".

    Raises:
        InputError: a split exists but holds a bad line (as `read_split`).
    """
    for split in ("val.jsonl", "train.jsonl"):
        path = project.prepared_dir(dataset) / split
        if path.is_file():
            rows = answerable(path, n, roles=CHAT_ROLES)
            if rows:
                return rows, project.rel(path)
    return FALLBACK_CONVERSATIONS[:n], "built-in"
