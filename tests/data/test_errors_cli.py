"""Malformed inputs through the real CLI: one exact line on stderr, exit code 2, no traceback.

Most of these fail before the tokenizer is needed, so each subprocess stays short.
"""

from __future__ import annotations

import json

import pytest

UTF8 = "re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8 IN > OUT"
STRICT = "fix the row, or run without --strict to drop bad rows"
GOOD = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n"


def msg(*pairs):
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in pairs]}) + "\n"


CASES = {
    "not_utf8_jsonl": (
        {"in.jsonl": GOOD.encode() + b'{"text": "caf\xe9"}\n'}, [],
        f"data/in.jsonl:2: not UTF-8 text (byte 0xe9 at column 14) (next: {UTF8})"),
    "not_utf8_json_array": (
        {"in.json": b'[\n{"text": "ok"},\n{"text": "\xff"}\n]'}, ["--source", "data/in.json"],
        f"data/in.json:3: not UTF-8 text (byte 0xff at column 11) (next: {UTF8})"),
    "not_utf8_csv": (
        {"in.csv": b"prompt,completion\na,b\n\xff,c\n"}, ["--source", "data/in.csv"],
        f"data/in.csv:3: not UTF-8 text (byte 0xff at column 1) (next: {UTF8})"),
    "truncated_jsonl": (
        {"in.jsonl": GOOD + '{"messages": [{"role": "user", "con'}, [],
        "data/in.jsonl:2: truncated JSON: the file ends inside a record (Unterminated string starting at) "
        "(next: the file was cut short: export or copy it again)"),
    "truncated_json_array": (
        {"in.json": '[\n{"text": "a"},\n{"text": "b"'}, ["--source", "data/in.json"],
        "data/in.json:3: truncated JSON: the file ends before the closing ']' "
        "(next: the file was cut short: export or copy it again)"),
    "truncated_json_array_between_rows": (
        {"in.json": '[\n{"text": "a"},\n'}, ["--source", "data/in.json"],
        "data/in.json:3: truncated JSON: the file ends before the closing ']' "
        "(next: the file was cut short: export or copy it again)"),
    "invalid_json_array": (
        {"in.json": '[\n{"text": "a"},\n{"text": oops}\n]'}, ["--source", "data/in.json"],
        "data/in.json:3: invalid JSON: Expecting value at column 10 (next: fix the file (a JSON array is parsed as "
        "a whole); JSONL drops only bad lines)"),
    "empty_file": ({"in.jsonl": ""}, [], "data/in.jsonl: the file is empty (next: check data.source)"),
    "missing_file": ({}, ["--source", "data/nope.jsonl"], None),  # absolute path: checked below
    "not_json_at_all": (
        {"in.txt": "hello world\n"}, ["--source", "data/in.txt"],
        "data/in.txt:1: not JSON, JSONL, CSV or Parquet (the file starts with b'hello world\\n') "
        "(next: pass --format, or convert the file to JSONL)"),
    "undetectable_format": (
        {"in.jsonl": '{"question": "a", "answer": "b"}\n'}, [],
        "data/in.jsonl:1: cannot detect the format: keys answer, question match none of messages, conversations "
        "(sharegpt), instruction+output (alpaca), prompt+completion, text, or a Label Studio export "
        "(next: map your keys to these with data.columns, e.g. --set data.columns.instruction=question "
        "--set data.columns.output=answer (or pass --format))"),
    "wrong_format": (
        {"in.jsonl": GOOD}, ["--format", "alpaca"],
        "data/in.jsonl:1: --format alpaca does not match the file: rows look like messages (messages) "
        "(next: --format messages (or --format auto))"),
    "all_rows_invalid": (
        {"in.jsonl": msg(("user", "a")) + msg(("robot", "b"))}, [],
        "data/in.jsonl: no usable rows (2 read; dropped: 2 invalid (first: data/in.jsonl:1 messages)) "
        "(next: fix the rows named above, or check --format)"),
    "strict_no_assistant": (
        {"in.jsonl": GOOD + msg(("user", "a"))}, ["--strict"],
        f"data/in.jsonl:2: messages: no assistant message: nothing to learn from this row (next: {STRICT})"),
    "strict_bad_role": (
        {"in.jsonl": GOOD + msg(("user", "a"), ("robot", "b"))}, ["--strict"],
        f"data/in.jsonl:2: messages[1].role: 'robot' is not one of system, user, assistant, tool (next: {STRICT})"),
    "strict_content_not_string": (
        {"in.jsonl": GOOD + json.dumps({"messages": [{"role": "user", "content": 5}]}) + "\n"}, ["--strict"],
        f"data/in.jsonl:2: messages[0].content: expected a string, got number (next: {STRICT})"),
    "strict_tool_calls_on_user": (
        {"in.jsonl": GOOD + json.dumps({"messages": [{"role": "user", "content": "a", "tool_calls": []}]}) + "\n"},
        ["--strict"],
        f"data/in.jsonl:2: messages[0].tool_calls: only assistant messages carry tool calls, not user (next: {STRICT})"),
    "strict_invalid_json_line": (
        {"in.jsonl": GOOD + '{"messages": [}\n' + GOOD}, ["--strict"],
        f"data/in.jsonl:2: <line>: not valid JSON: Expecting value at column 15 (next: {STRICT})"),
    "strict_alpaca_missing_output": (
        {"in.jsonl": '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": null}\n'}, ["--strict"],
        f"data/in.jsonl:2: output: missing (next: {STRICT})"),
    "strict_alpaca_bad_history": (
        {"in.jsonl": '{"instruction": "a", "output": "b", "history": [["x"]]}\n'}, ["--strict"],
        f"data/in.jsonl:1: history[0]: expected a (user, assistant) pair of strings (next: {STRICT})"),
    "strict_sharegpt_unknown_speaker": (
        {"in.jsonl": json.dumps({"conversations": [{"from": "alien", "value": "x"}]}) + "\n"}, ["--strict"],
        "data/in.jsonl:1: conversations[0].from: 'alien' is not one of human, gpt, system, tool "
        f"(or user, assistant, observation, function_call) (next: {STRICT})"),
    "strict_empty_prompt": (
        {"in.jsonl": '{"prompt": "  ", "completion": "b"}\n'}, ["--strict"],
        f"data/in.jsonl:1: prompt: empty (next: {STRICT})"),
    "csv_missing_mapped_column": (
        {"in.csv": "q,a\nx,y\n"}, ["--source", "data/in.csv", "--set", "data.columns.prompt=question"],
        "data/in.csv:1: data.columns.prompt: column 'question' is not in the header (columns: q, a) (next: fix data.columns)"),
    "csv_ragged_row_strict": (
        {"in.csv": "prompt,completion\na,b\nc,d,e\n"}, ["--source", "data/in.csv", "--strict"],
        f"data/in.csv:3: <row>: 3 cells but the header has 2 columns (next: {STRICT})"),
    "not_parquet": (
        {"in.parquet": b"PAR1 this is not parquet"}, ["--source", "data/in.parquet"], None),
    "label_studio_all_cancelled": (
        {"in.json": json.dumps([{"id": 1, "data": {"prompt": "p"}, "annotations": [{"id": 1, "was_cancelled": True, "result": []}]},
                                {"id": 2, "data": {"prompt": "q"}, "annotations": []}])},
        ["--source", "data/in.json"],
        "data/in.json: no usable rows (2 read; dropped: 2 no annotation (first: data/in.json:1 annotations)) "
        "(next: annotate the tasks in Label Studio and export again)"),
    "label_studio_missing_prompt_strict": (
        {"in.json": json.dumps([{"id": 1, "data": {"text": "p"}, "annotations": []}])},
        ["--source", "data/in.json", "--strict"],
        f"data/in.json:1: data.prompt: missing (next: {STRICT})"),
    "no_source": ({}, ["--set", "data.source=null"],
                  "data.source: not set (next: ftpipe preprocess-sft --source PATH (or set data.source, or "
                  "data.dataset_info.file and .entry))"),
    "label_studio_api_without_url": (
        {}, ["--format", "label_studio_api"],
        "data.label_studio.url: required for format label_studio_api (next: --set data.label_studio.url=http://HOST:8080)"),
    "unknown_format_name": ({"in.jsonl": GOOD}, ["--format", "yaml"], None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_input_is_one_line_exit_2(proj, case):
    files, args, expected = CASES[case]
    for name, content in files.items():
        proj.write(name, content)
    result = proj.cli(*args)
    assert result.code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and result.stderr.rstrip().endswith(lines[0]), result.stderr
    line = lines[0]
    if case == "missing_file":
        expected = f"data.source {proj.root / 'data/nope.jsonl'}: dataset file not found (next: check data.source (relative to {proj.root}))"
    elif case == "not_parquet":
        assert line.startswith("error: data/in.parquet: not a Parquet file (ArrowInvalid: ")
        return
    elif case == "unknown_format_name":
        assert line.startswith("error: flag for data.format: data.format: Input should be 'auto', 'alpaca'")
        return
    assert line == f"error: {expected}"


def test_too_long_rows_are_an_empty_result_with_a_hint(proj):
    proj.write("in.jsonl", json.dumps({"messages": [{"role": "user", "content": "word " * 200},
                                                    {"role": "assistant", "content": "ok"}]}) + "\n")
    result = proj.cli("--set", "preprocess.max_length=16")
    assert result.code == 2 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines()[-1] == (
        "error: data/in.jsonl: no usable rows (1 read; dropped: 1 too long (first: data/in.jsonl:1, 411 tokens > "
        "preprocess.max_length=16)) (next: raise preprocess.max_length or set preprocess.overlength=truncate "
        "(text rows: chunk))")
