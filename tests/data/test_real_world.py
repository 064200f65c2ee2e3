"""Data as LLaMA-Factory and Label Studio users bring it (issue 17), from small files written here,
through the real stage: column and tag mappings, dataset_info.json entries, content parts, tools
under a template without tool support, Label Studio JSON-MIN and CSV exports, compressed files,
rows over the size limit (and the memory they cost), placeholders, text chunking, and the one line
per failure the CLI prints."""

from __future__ import annotations

import bz2
import gzip
import json
import os
import subprocess
import sys

import pytest

from ftpipe.core.errors import ConfigError, InputError
from tests.data.conftest import Proj
from tests.data.test_formats import all_rows, chat


def contents(proj):
    return sorted([m["content"] for m in r["messages"]] for r in all_rows(proj))


# ---------------------------------------------------------------- LLaMA-Factory columns and tags

def test_columns_map_json_keys(proj):
    rows = [{"question": f"q{i}", "response": f"a{i}", "system_prompt": "be brief"} for i in range(4)]
    proj.jsonl("in.jsonl", rows)
    proj.config(extra="")
    text = (proj.root / "config.yaml").read_text()
    (proj.root / "config.yaml").write_text(text.replace(
        "  source: data/in.jsonl\n",
        "  source: data/in.jsonl\n  columns: {instruction: question, output: response, system: system_prompt}\n"))
    result = proj.stage()
    assert result.metrics["rows_read"] == 4 and result.metrics["rows_kept"] == 4
    assert contents(proj) == sorted([["be brief", f"q{i}", f"a{i}"] for i in range(4)])
    assert proj.metadata()["format"] == "alpaca"


def test_a_mapped_key_missing_is_named_as_the_file_names_it(proj):
    proj.jsonl("in.jsonl", [{"question": "q", "response": "a"}, {"question": "q2"}])
    with pytest.raises(InputError) as err:
        proj.stage("data.columns.instruction=question", "data.columns.output=response", "preprocess.strict=true")
    assert err.value.message == "data/in.jsonl:2: response: missing"


def test_sharegpt_tags_openai_style_messages(proj):
    rows = [{"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": f"q{i}"},
                          {"role": "assistant", "content": f"a{i}"}]} for i in range(3)]
    rows.append({"messages": [{"role": "bot", "content": "x"}]})
    proj.jsonl("in.jsonl", rows)
    result = proj.stage("data.format=sharegpt", "data.columns.conversations=messages", "data.tags.role_tag=role",
                        "data.tags.content_tag=content", "data.tags.user_tag=user",
                        "data.tags.assistant_tag=assistant")
    assert result.metrics["rows_kept"] == 3 and result.metrics["dropped_invalid"] == 1
    assert contents(proj) == sorted([["sys", f"q{i}", f"a{i}"] for i in range(3)])
    assert proj.metadata()["errors"]["first"] == [
        "data/in.jsonl:4: messages[0].role: 'bot' is not one of the data.tags speakers 'user', 'assistant', "
        "'observation', 'function_call', 'system'"]


def _dataset_info(proj, entries):
    proj.write("dataset_info.json", json.dumps(entries))
    proj.config(source=None, extra="")
    text = (proj.root / "config.yaml").read_text()
    (proj.root / "config.yaml").write_text(text.replace(
        "data:\n", "data:\n  dataset_info: {file: data/dataset_info.json, entry: mine}\n"))


def test_dataset_info_alpaca_entry_with_columns(proj):
    proj.write("qa.json", json.dumps([{"q": f"q{i}", "ctx": "c", "a": f"a{i}", "sys": "s",
                                       "hist": [["h", "hh"]]} for i in range(3)]))
    _dataset_info(proj, {"mine": {"file_name": "qa.json", "columns": {
        "prompt": "q", "query": "ctx", "response": "a", "system": "sys", "history": "hist"}}})
    result = proj.stage()
    assert result.metrics["rows_kept"] == 3
    assert contents(proj) == sorted([["s", "h", "hh", f"q{i}\nc", f"a{i}"] for i in range(3)])
    meta = proj.metadata()
    assert meta["format"] == "alpaca" and meta["source"]["path"] == "data/qa.json"
    assert meta["dataset_info"] == {"file": "data/dataset_info.json", "entry": "mine"}


def test_dataset_info_sharegpt_entry_with_tags_and_tools(proj):
    rows = [{"dialog": [{"speaker": "me", "text": f"q{i}"}, {"speaker": "ai", "text": f"a{i}"}],
             "sp": "sys"} for i in range(3)]
    proj.jsonl("chat.jsonl", rows)
    _dataset_info(proj, {"mine": {"file_name": "chat.jsonl", "formatting": "sharegpt",
                                  "columns": {"messages": "dialog", "system": "sp"},
                                  "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "me",
                                           "assistant_tag": "ai"}}})
    result = proj.stage()
    assert result.metrics["rows_kept"] == 3
    assert contents(proj) == sorted([["sys", f"q{i}", f"a{i}"] for i in range(3)])


@pytest.mark.parametrize("entries, expected", [
    ({"other": {"file_name": "x.json"}},
     "data.dataset_info.entry: 'mine' is not in data/dataset_info.json (entries: other)"),
    ({"mine": {"hf_hub_url": "org/data"}},
     "data/dataset_info.json: entry 'mine' names no local file (hf_hub_url: org/data)"),
    ({"mine": {"file_name": "x.json", "ranking": True}},
     "data/dataset_info.json: entry 'mine' is a preference (ranking) dataset: preprocess-sft prepares SFT data only"),
    ({"mine": {"file_name": "x.json", "columns": {"images": "img"}}},
     "data/dataset_info.json: entry 'mine': columns.images is not supported by preprocess-sft (text SFT data only)"),
])
def test_dataset_info_refusals_name_the_key(proj, entries, expected):
    _dataset_info(proj, entries)
    with pytest.raises(ConfigError) as err:
        proj.stage()
    assert err.value.message == expected


# ---------------------------------------------------------------- content parts

def test_content_part_lists_text_and_value(proj):
    rows = [
        {"messages": [{"role": "user", "content": [{"type": "text", "value": "q1"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "value": "1"}]}]},
        {"conversations": [{"from": "human", "value": [{"type": "text", "value": "q2"}]},
                           {"from": "gpt", "value": "a2"}]},
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "x.png"}]},
                      {"role": "assistant", "content": "a3"}]},
    ]
    proj.jsonl("in.jsonl", [rows[0], rows[2]])
    result = proj.stage("preprocess.val_fraction=0")
    assert result.metrics["rows_kept"] == 1
    assert contents(proj) == [["q1", "a1"]]
    assert proj.metadata()["errors"]["first"] == [
        "data/in.jsonl:2: messages[0].content[0]: a 'image' part: only text parts "
        "({\"type\": \"text\", \"text\" or \"value\": ...}) are supported"]
    proj.jsonl("in.jsonl", [rows[1]])
    proj.stage("preprocess.val_fraction=0")
    assert contents(proj) == [["q2", "a2"]]


# ---------------------------------------------------------------- tools under a template without tools

TOOL_ROW = {
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "name": "weather", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."},
    ],
    "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}],
}


def test_tools_are_a_row_error_by_default_and_text_by_choice(proj, caplog):
    proj.jsonl("in.jsonl", [{"messages": chat("q", "a")}, TOOL_ROW])
    result = proj.stage("preprocess.val_fraction=0")
    assert result.metrics["rows_kept"] == 1 and result.metrics["dropped_invalid"] == 1
    assert "set preprocess.tools_fallback=text" in proj.metadata()["errors"]["first"][0]
    with caplog.at_level("WARNING"):
        result = proj.stage("preprocess.val_fraction=0", "preprocess.tools_fallback=text")
    assert result.metrics["rows_kept"] == 2 and result.metrics["dropped_invalid"] == 0
    row = next(r for r in proj.out("train") if len(r["messages"]) > 2)
    assert "tools" not in row
    assert row["messages"] == [
        {"role": "system", "content": "You can call these tools (JSON definitions):\n"
                                      '{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}'},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": '<tool_call>{"name": "weather", "arguments": {"city": "Paris"}}</tool_call>'},
        {"role": "user", "content": "Tool result (weather): sunny"},
        {"role": "assistant", "content": "Sunny."},
    ]
    assert proj.metadata()["render"]["tools_as_text"] == 1
    assert any("1 rows with tools or tool calls written as text" in r.getMessage() for r in caplog.records)


def test_tools_render_under_a_tool_template_even_with_the_text_fallback(tool_proj):
    tool_proj.jsonl("in.jsonl", [{"messages": chat("q", "a")}, TOOL_ROW])
    tool_proj.stage("preprocess.val_fraction=0", "preprocess.tools_fallback=text")
    row = next(r for r in tool_proj.out("train") if "tools" in r)
    assert row["messages"][1]["tool_calls"][0]["function"]["name"] == "weather"
    assert tool_proj.metadata()["render"]["tools_as_text"] == 0


# ---------------------------------------------------------------- Label Studio JSON-MIN and CSV exports

MIN_ROWS = [
    {"prompt": "Say hi", "id": 1, "response": "hi", "annotator": 1, "annotation_id": 11,
     "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z", "lead_time": 3.2},
    {"prompt": "Say yo", "id": 2, "response": {"text": ["yo", "yo!"]}, "annotator": 1, "annotation_id": 12,
     "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z", "lead_time": 1.0},
    {"prompt": "Unlabelled", "id": 3, "annotator": 1, "annotation_id": 13,
     "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z", "lead_time": 0},
]


def test_label_studio_json_min_export_is_detected(proj):
    proj.write("export.json", json.dumps(MIN_ROWS, indent=2))
    result = proj.stage("data.source=data/export.json", "preprocess.val_fraction=0")
    assert proj.metadata()["format"] == "label_studio_min"
    assert contents(proj) == [["Say hi", "hi"], ["Say yo", "yo\nyo!"]]
    assert result.metrics["dropped_no_annotation"] == 1


def test_label_studio_csv_export_is_detected(proj):
    proj.write("export.csv", "prompt,id,answer,annotator,annotation_id,created_at,updated_at,lead_time\n"
                             "Say hi,1,hi,1,11,2026-01-01,2026-01-01,3.2\n"
                             "Say yo,2,\"yo, there\",1,12,2026-01-01,2026-01-01,1.0\n"
                             "Unlabelled,3,,1,13,2026-01-01,2026-01-01,0\n")
    result = proj.stage("data.source=data/export.csv", "preprocess.val_fraction=0")
    assert proj.metadata()["format"] == "label_studio_min"
    assert contents(proj) == [["Say hi", "hi"], ["Say yo", "yo, there"]]
    assert result.metrics["dropped_no_annotation"] == 1


def test_label_studio_flat_export_with_two_answer_fields_names_the_key(proj):
    row = {k: v for k, v in MIN_ROWS[0].items() if k != "response"}
    proj.write("export.json", json.dumps([{**row, "summary": "s", "critique": "c"}]))
    with pytest.raises(ConfigError) as err:
        proj.stage("data.source=data/export.json")
    assert err.value.one_line() == (
        "data/export.json:1: Label Studio JSON-MIN/CSV export: several fields could hold the answer (summary, critique) "
        "(next: --set data.label_studio.answer_from_name=NAME (the TextArea's name))")
    proj.stage("data.source=data/export.json", "data.label_studio.answer_from_name=critique", "preprocess.val_fraction=0")
    assert contents(proj) == [["Say hi", "c"]]


# ---------------------------------------------------------------- compressed inputs

def test_compressed_inputs_stream_like_plain_ones(proj):
    import zstandard

    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(5)]
    text = "".join(json.dumps(r) + "\n" for r in rows).encode()
    proj.write("in.jsonl", text)
    proj.stage("preprocess.val_fraction=0")
    expected = proj.out("train")
    csv_text = ("instruction,output\n" + "".join(f"q{i},a{i}\n" for i in range(5))).encode()
    for name, data in [("in.jsonl.gz", gzip.compress(text)), ("in.json.bz2", bz2.compress(json.dumps(rows).encode())),
                       ("in.jsonl.zst", zstandard.ZstdCompressor().compress(text)),
                       ("in.csv.zst", zstandard.ZstdCompressor().compress(csv_text))]:
        proj.write(name, data)
        proj.stage(f"data.source=data/{name}", "preprocess.val_fraction=0")
        assert proj.out("train") == expected, name


def test_corrupt_gzip_is_one_line(proj):
    data = gzip.compress(b'{"text": "hello"}\n' * 1000)
    proj.write("in.jsonl.gz", data[: len(data) // 2])
    with pytest.raises(InputError) as err:
        proj.stage("data.source=data/in.jsonl.gz")
    assert err.value.one_line().startswith("data/in.jsonl.gz: not valid gzip data, or the file is cut short (EOFError: ")
    assert err.value.one_line().endswith("(next: the file is damaged: compress, export or copy it again)")


# ---------------------------------------------------------------- rows over the size limit

def test_rows_over_max_row_bytes_are_row_errors(proj):
    big = {"messages": chat("x" * 5000, "a")}
    proj.jsonl("in.jsonl", [{"messages": chat("q", "a")}, big])
    proj.write("in.json", json.dumps([{"messages": chat("q", "a")}, big]))
    proj.write("in.csv", "prompt,completion\nq,a\n" + "x" * 5000 + ",a\n")
    for name, line in (("in.jsonl", 2), ("in.json", 1), ("in.csv", 3)):
        result = proj.stage(f"data.source=data/{name}", "preprocess.max_row_bytes=4096", "preprocess.val_fraction=0")
        assert result.metrics["rows_kept"] == 1 and result.metrics["dropped_too_large"] == 1, name
        first = proj.metadata()["errors"]["first"][0]
        assert first.startswith(f"data/{name}:") and "over preprocess.max_row_bytes (0.0 MiB)" in first, first


def test_a_10_mb_row_costs_under_300_mb(proj):
    proj.jsonl("in.jsonl", [{"messages": chat(f"q{i}", "a")} for i in range(3)])
    proj.stage()  # fills the tokenizer cache, as any earlier run of the project does
    with open(proj.root / "data" / "in.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"messages": chat("word " * (2 * 2**20), "a")}) + "\n")
    probe = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:], capture_output=True).returncode; "
             "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "ftpipe", "preprocess-sft", "--force",
                          "--config", str(proj.root / "config.yaml")], cwd=proj.root, capture_output=True, text=True,
                         env={**os.environ, "FTPIPE_ENV": "train"}, timeout=300, check=True)
    rc, kib = map(int, out.stdout.split())
    assert rc == 0
    assert kib < 300 * 1024, f"peak RSS {kib / 1024:.0f} MiB"
    assert proj.metadata()["counts"]["dropped"]["too_large"] == 1


# ---------------------------------------------------------------- placeholders

def test_placeholders_reported_then_filled(proj, caplog):
    rows = [{"instruction": "Who are you?", "output": "I am {{name}}, made by {{author}}."},
            {"instruction": "Name?", "output": "{{ name }}."}, {"instruction": "Hi", "output": "Hello"}]
    proj.jsonl("in.jsonl", rows)
    with caplog.at_level("WARNING"):
        proj.stage("preprocess.val_fraction=0")
    assert proj.metadata()["placeholders"] == {"author": {"rows": 1, "first_lines": [1]},
                                               "name": {"rows": 2, "first_lines": [1, 2]}}
    warnings = [r.getMessage() for r in caplog.records if "unfilled" in r.getMessage()]
    assert warnings == [
        "data/in.jsonl: {{author}} is left unfilled in 1 rows (lines 1): it is trained literally "
        "(fill it: --set data.placeholders.author=VALUE)",
        "data/in.jsonl: {{name}} is left unfilled in 2 rows (lines 1, 2): it is trained literally "
        "(fill it: --set data.placeholders.name=VALUE)"]
    proj.stage("preprocess.val_fraction=0", "data.placeholders.name=ftpipe", "data.placeholders.author=Acme")
    assert proj.metadata()["placeholders"] == {}
    assert sorted(r["messages"][1]["content"] for r in proj.out("train")) == [
        "Hello", "I am ftpipe, made by Acme.", "ftpipe."]


# ---------------------------------------------------------------- text chunking

def test_text_rows_chunk_into_max_length_windows(proj):
    long_text = " ".join(f"word{i % 97} is here." for i in range(400))
    proj.jsonl("in.jsonl", [{"text": long_text}, {"text": "short text"}])
    result = proj.stage("preprocess.val_fraction=0", "preprocess.max_length=64")
    assert result.metrics["rows_read"] == 2 and result.metrics["dropped_too_long"] == 1  # drop: the default
    result = proj.stage("preprocess.val_fraction=0", "preprocess.max_length=64", "preprocess.overlength=chunk")
    rows = proj.out("train")
    meta = proj.metadata()
    assert meta["counts"]["chunked"] == 1 and meta["counts"]["chunks"] == len(rows) - 1 > 5
    assert meta["tokens"]["max"] <= 64 and meta["counts"]["dropped"]["too_long"] == 0
    assert "".join(r["messages"][0]["content"] for r in rows if r["messages"][0]["content"] != "short text") == long_text


# ---------------------------------------------------------------- one line per failure on stderr

def test_failures_print_once_one_line_each_and_user_text_stays_text(proj):
    noisy = ":x: [bold red]boom[/bold red] :thumbs_up: " + "long " * 60
    proj.jsonl("in.jsonl", [{"messages": [{"role": "robot", "content": noisy}]} for _ in range(3)])
    result = proj.cli()
    assert result.code == 2, result.output
    lines = result.stderr.splitlines()
    warnings = [line for line in lines if line.startswith("WARNING")]
    assert warnings == ["WARNING  data/in.jsonl:%d: messages[0].role: 'robot' is not one of system, user, assistant, "
                        "tool" % i for i in (1, 2, 3)]
    assert not any("failed:" in line or line.startswith("ERROR") for line in lines), result.stderr
    assert lines[-1] == ("error: data/in.jsonl: no usable rows (3 read; dropped: 3 invalid (first: data/in.jsonl:1 "
                         "messages[0].role)) (next: fix the rows named above, or check --format)")
    assert sum("no usable rows" in line for line in lines) == 1
    proj.jsonl("in.jsonl", [{"messages": [{"role": "user", "content": noisy}, {"role": "robot", "content": ":x:"}]}])
    result = proj.cli("--strict")
    assert result.stderr.splitlines()[-1] == (
        "error: data/in.jsonl:1: messages[1].role: 'robot' is not one of system, user, assistant, tool "
        "(next: fix the row, or run without --strict to drop bad rows)")
    bad_role = json.dumps({"messages": [{"role": ":x: [b]x[/b]", "content": "q"}, {"role": "assistant", "content": "a"}]})
    proj.write("in.jsonl", bad_role + "\n")
    result = proj.cli("--strict")
    assert result.stderr.splitlines()[-1] == (
        "error: data/in.jsonl:1: messages[0].role: ':x: [b]x[/b]' is not one of system, user, assistant, tool "
        "(next: fix the row, or run without --strict to drop bad rows)")
    assert "❌" not in result.stderr and "👍" not in result.stderr
