"""The one reader of a prepared split and the one meaning of "the prompt" of a conversation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftpipe.core.errors import InputError
from ftpipe.core.runs import Project
from ftpipe.handoff.prepared import (
    FALLBACK_CONVERSATIONS,
    prompt,
    read_chat_rows,
    read_split,
    read_training_rows,
    reference,
    sample_conversations,
    split_prompts,
)

SYSTEM = {"role": "system", "content": "Answer briefly."}
U1 = {"role": "user", "content": "Name a prime."}
A1 = {"role": "assistant", "content": "Seven."}
U2 = {"role": "user", "content": "Another?"}
A2 = {"role": "assistant", "content": "Eleven."}
MULTI_TURN = [SYSTEM, U1, A1, U2, A2]


def _write(path: Path, lines: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


def test_prompt_is_every_turn_before_the_last_assistant_turn():
    assert prompt(MULTI_TURN) == [SYSTEM, U1, A1, U2]
    assert reference(MULTI_TURN) == "Eleven."
    # A user turn after the last answer is not part of the prompt (the prompt ends before the answer).
    assert prompt([U1, A1, U2]) == [U1]
    assert reference([U1, A1, U2]) == "Seven."
    # No assistant turn: all of it is prompt, and there is no reference answer.
    assert prompt([SYSTEM, U1]) == [SYSTEM, U1]
    assert reference([SYSTEM, U1]) is None


def test_read_split_streams_rows_with_a_limit(tmp_path):
    rows = [{"messages": [U1, {"role": "assistant", "content": str(i)}], "id": i} for i in range(5)]
    split = _write(tmp_path / "val.jsonl", [rows[0], "", "   ", *rows[1:]])
    assert list(read_split(split)) == [r["messages"] for r in rows]
    assert list(read_split(split, limit=2)) == [r["messages"] for r in rows[:2]]
    assert list(read_split(split, limit=0)) == []
    # Streaming: a bad line after the limit is never read.
    bad_tail = _write(tmp_path / "tail.jsonl", [rows[0], rows[1], "{not json"])
    assert len(list(read_split(bad_tail, limit=2))) == 2
    with pytest.raises(InputError, match=r"tail\.jsonl:3: invalid JSON"):
        list(read_split(bad_tail))


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([{"messages": [U1, A1]}, "{oops"], r":2: invalid JSON \(Expecting property name"),
        ([{"messages": [U1, A1]}, "", [1, 2]], r":3: expected \{\"messages\": \[\.\.\.\]\} with a non-empty list"),
        ([{"text": "no messages"}], r":1: expected \{\"messages\""),
        ([{"messages": []}], r":1: expected \{\"messages\""),
        ([{"messages": [U1, {"content": "no role"}]}], r":1: messages\[1\]: expected an object with a string `role`"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, lines, message):
    split = _write(tmp_path / "train.jsonl", lines)
    with pytest.raises(InputError, match=str(split).replace(".", r"\.") + message) as info:
        list(read_split(split))
    assert info.value.hint == "ftpipe preprocess-sft --force"


def test_missing_split_says_to_preprocess(tmp_path):
    with pytest.raises(InputError, match=r"val\.jsonl: prepared split not found") as info:
        read_split(tmp_path / "val.jsonl")  # raised at the call, not at the first row
    assert info.value.hint == "ftpipe preprocess-sft"


def test_training_rows_keep_role_and_content_only(tmp_path):
    split = _write(tmp_path / "train.jsonl", [
        {"messages": [U1, {"role": "assistant", "content": None, "tool_calls": [{"id": "x"}]}], "source": "a"},
    ])
    assert read_training_rows(split) == [{"messages": [U1, {"role": "assistant", "content": ""}]}]


def test_chat_rows_keep_tool_calls_and_tools(tmp_path):
    """What finetune-sft trains on: messages as written and the row's tools (nothing else)."""
    call = {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}]}
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    split = _write(tmp_path / "train.jsonl", [
        {"messages": [U1, call], "tools": tools, "source": "a"},
        {"messages": [U1, A1], "tools": []},
    ])
    assert read_chat_rows(split) == [{"messages": [U1, call], "tools": tools}, {"messages": [U1, A1]}]
    with pytest.raises(InputError, match="not found"):
        read_chat_rows(tmp_path / "missing.jsonl")


def test_split_prompts_skip_conversations_without_a_user_turn(tmp_path):
    no_user = {"messages": [SYSTEM, A1]}
    split = _write(tmp_path / "val.jsonl", [no_user, {"messages": MULTI_TURN}, {"messages": [U2, A2]}, {"messages": [U1, A1]}])
    assert split_prompts(split, 2) == [[SYSTEM, U1, A1, U2], [U2]]
    only_bad = _write(tmp_path / "bad.jsonl", [no_user])
    with pytest.raises(InputError, match=r"bad\.jsonl: no conversation with a user turn"):
        split_prompts(only_bad, 4)


def _project(root: Path) -> Project:
    return Project(root=root, prepared=root / "prepared", outputs=root / "outputs", logs=root / "logs")


def test_sample_conversations_prefer_val_then_train_then_built_in(tmp_path):
    project = _project(tmp_path)
    assert sample_conversations(project, "ds", 2) == (FALLBACK_CONVERSATIONS[:2], "built-in")
    tool = {"role": "tool", "content": "42"}
    _write(tmp_path / "prepared/ds/train.jsonl", [{"messages": [U1, tool, A1]}])
    assert sample_conversations(project, "ds", 2) == ([[U1, A1]], "prepared/ds/train.jsonl")
    _write(tmp_path / "prepared/ds/val.jsonl", [{"messages": MULTI_TURN}, {"messages": [U2, A2]}, {"messages": [U1, A1]}])
    conversations, source = sample_conversations(project, "ds", 2)
    assert source == "prepared/ds/val.jsonl" and conversations == [MULTI_TURN, [U2, A2]]
