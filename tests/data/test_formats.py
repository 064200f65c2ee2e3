"""Each input format, from small files written here, through the real stage (in-process)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq


def chat(user, answer, system=None):
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def all_rows(proj):
    return proj.out("train") + proj.out("val")


def test_messages_jsonl_keeps_tool_calls_and_tools(tool_proj):
    proj = tool_proj
    tool_row = {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "{\"temp\": 21}"},
            {"role": "assistant", "content": "21 degrees."},
        ],
        "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}],
    }
    rows = [{"messages": chat(f"q{i}", f"a{i}", "sys")} for i in range(9)] + [tool_row]
    proj.jsonl("in.jsonl", rows)
    result = proj.stage("preprocess.val_fraction=0.0")
    out = proj.out("train")
    assert len(out) == 10 and proj.out("val") == []
    kept = next(r for r in out if "tools" in r)
    assert kept["messages"][1]["tool_calls"][0]["function"]["name"] == "weather"
    assert kept["messages"][1]["content"] == ""
    assert kept["messages"][2] == {"role": "tool", "content": "{\"temp\": 21}", "tool_call_id": "c1"}
    assert kept["tools"] == tool_row["tools"]
    assert out[0] == {"messages": chat("q0", "a0", "sys")}
    meta = proj.metadata()
    assert meta["format"] == "messages" and meta["counts"]["kept"] == 10
    assert result.metrics["rows_train"] == 10


def test_alpaca_json_and_jsonl_with_system_and_history(proj):
    rows = [
        {"instruction": "Translate", "input": "chat", "output": "cat", "system": "You translate.",
         "history": [["hi", "hello"]]},
        {"instruction": "Say yes", "input": "", "output": "yes"},
    ]
    proj.write("in.json", json.dumps(rows, indent=2))
    proj.config(source="data/in.json")
    proj.stage("preprocess.val_fraction=0.0")
    out = proj.out("train")
    assert out[0]["messages"] == [
        {"role": "system", "content": "You translate."},
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "Translate\nchat"}, {"role": "assistant", "content": "cat"},
    ]
    assert out[1]["messages"] == chat("Say yes", "yes")
    assert proj.metadata()["format"] == "alpaca"
    proj.jsonl("in.jsonl", rows)
    proj.config(source="data/in.jsonl")
    proj.stage("preprocess.val_fraction=0.0")
    assert proj.out("train") == out


def test_sharegpt_roles(tool_proj):
    proj = tool_proj
    row = {"system": "Be brief.", "conversations": [
        {"from": "human", "value": "Weather?"},
        {"from": "function_call", "value": json.dumps({"name": "weather", "arguments": {"city": "Oslo"}})},
        {"from": "observation", "value": "rain"},
        {"from": "gpt", "value": "Rain."},
    ]}
    proj.jsonl("in.jsonl", [row, {"conversations": [{"from": "user", "value": "a"}, {"from": "assistant", "value": "b"}]}])
    proj.stage("preprocess.val_fraction=0.0")
    first = proj.out("train")[0]["messages"]
    assert [m["role"] for m in first] == ["system", "user", "assistant", "tool", "assistant"]
    assert first[2]["tool_calls"][0]["function"] == {"name": "weather", "arguments": {"city": "Oslo"}}
    assert proj.metadata()["format"] == "sharegpt"


def test_prompt_completion_and_text(proj):
    proj.jsonl("in.jsonl", [{"prompt": "2+2=", "completion": "4"}, {"prompt": [{"role": "user", "content": "hi"}],
                                                                      "completion": [{"role": "assistant", "content": "yo"}]}])
    proj.stage("preprocess.val_fraction=0.0")
    assert [r["messages"] for r in proj.out("train")] == [chat("2+2=", "4"), chat("hi", "yo")]
    proj.jsonl("in.jsonl", [{"text": "Once upon a time."}])
    proj.stage()
    assert proj.out("train") == [{"messages": [{"role": "assistant", "content": "Once upon a time."}]}]
    assert proj.metadata()["format"] == "text"


def test_csv_with_column_mapping(proj):
    proj.write("in.csv", 'question,answer,note\n"What is 1+1?",2,x\n"Multi\nline?",yes,y\n')
    proj.config(source="data/in.csv", extra="")
    proj.stage("data.columns.prompt=question", "data.columns.completion=answer", "preprocess.val_fraction=0.0")
    assert [r["messages"] for r in proj.out("train")] == [chat("What is 1+1?", "2"), chat("Multi\nline?", "yes")]
    assert proj.metadata()["format"] == "prompt_completion"


def test_parquet_with_column_mapping(proj):
    table = pa.table({"q": ["a?", "b?", "c?"], "a": ["A", "B", "C"], "sys": ["S", None, "S"]})
    pq.write_table(table, proj.root / "data" / "in.parquet")
    proj.config(source="data/in.parquet")
    proj.stage("data.columns.instruction=q", "data.columns.output=a", "data.columns.system=sys",
               "preprocess.val_fraction=0.0")
    assert [r["messages"] for r in proj.out("train")] == [chat("a?", "A", "S"), chat("b?", "B"), chat("c?", "C", "S")]
    assert proj.metadata()["format"] == "alpaca"


def test_label_studio_export_annotations(proj):
    def ann(aid, text, cancelled=False, truth=False, updated="2026-01-01T00:00:00Z"):
        return {"id": aid, "was_cancelled": cancelled, "ground_truth": truth, "updated_at": updated,
                "result": [{"from_name": "answer", "to_name": "prompt", "type": "textarea", "value": {"text": [text]}}]}

    tasks = [
        {"id": 1, "data": {"prompt": "P1"}, "annotations": [ann(1, "old"), ann(2, "new", updated="2026-02-01T00:00:00Z")]},
        {"id": 2, "data": {"prompt": "P2"}, "annotations": [ann(3, "truth", truth=True), ann(4, "later", updated="2026-03-01T00:00:00Z")]},
        {"id": 3, "data": {"prompt": "P3"}, "annotations": [ann(5, "skip", cancelled=True, updated="2026-05-01T00:00:00Z"), ann(6, "kept")]},
        {"id": 4, "data": {"prompt": "P4"}, "annotations": [ann(7, "x", cancelled=True)]},
        {"id": 5, "data": {"prompt": "P5"}, "annotations": []},
    ]
    proj.write("export.json", json.dumps(tasks))
    proj.config(source="data/export.json")
    proj.stage("preprocess.val_fraction=0.0")
    answers = {r["messages"][0]["content"]: r["messages"][1]["content"] for r in proj.out("train")}
    assert answers == {"P1": "new", "P2": "truth", "P3": "kept"}
    meta = proj.metadata()
    assert meta["format"] == "label_studio"
    assert meta["counts"]["dropped"]["no_annotation"] == 2 and meta["errors"]["count"] == 0
    proj.stage("data.label_studio.annotation=latest", "preprocess.val_fraction=0.0")
    answers = {r["messages"][0]["content"]: r["messages"][1]["content"] for r in proj.out("train")}
    assert answers["P2"] == "later"


def test_quick_decoder_is_trusted_only_for_plain_messages_rows():
    from ftpipe.data.rowwork import quick_plain

    row = {"messages": [{"role": "user", "content": "é \\u00e9 😀"}, {"role": "assistant", "content": "ok"}]}
    assert quick_plain(json.dumps(row)) == row
    assert quick_plain(json.dumps(row, ensure_ascii=False)) == row
    # Everything else goes to json.loads (same rows, same errors as before): not plain, numbers,
    # NaN, lone surrogates, invalid JSON, deep nesting.
    for line in ['{"messages": [{"role": "user", "content": "hi"}], "n": 123456789012345678901234567890}',
                 '{"instruction": "a", "output": "b"}',
                 '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": NaN}]}',
                 '{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "x"}]}',
                 '{"messages": [', "[" * 5000 + "]" * 5000]:
        assert quick_plain(line) is None, line
