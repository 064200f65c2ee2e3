"""Rows with tools / tool calls: rendered under a template that supports them (Qwen2.5), row errors
naming the fix under one that drops them (Phi-3.5): never an empty assistant turn."""

from __future__ import annotations

import pytest

from tests.data.conftest import Proj, chat

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
TOOL_ROW = {
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "a1b2c3d4e", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "name": "get_weather", "tool_call_id": "a1b2c3d4e", "content": "sunny, 21 C"},
        {"role": "assistant", "content": "Sunny and 21 C."},
    ],
    "tools": TOOLS,
}


def _rows(n_plain: int, n_tool: int) -> list[dict]:
    rows = [chat(f"Review {i}: fine.", "positive") for i in range(n_plain)]
    for i in range(n_tool):
        row = {**TOOL_ROW, "messages": [{**TOOL_ROW["messages"][0], "content": f"Weather in Paris, {i}?"},
                                        *TOOL_ROW["messages"][1:]]}
        rows.append(row)
    return rows


def test_tool_rows_render_under_a_tool_template(tmp_path, family_model):
    from transformers import AutoTokenizer

    proj = Proj(tmp_path, family_model("qwen2.5"))
    proj.jsonl("in.jsonl", _rows(6, 4))
    result = proj.stage("preprocess.val_fraction=0")
    assert result.metrics["rows_kept"] == 10 and result.metrics["dropped_invalid"] == 0
    kept = [r for r in proj.out("train") if "tools" in r]
    assert len(kept) == 4
    tok = AutoTokenizer.from_pretrained(proj.model)
    text = tok.apply_chat_template(kept[0]["messages"], tools=kept[0]["tools"], tokenize=False)
    assert '"name": "get_weather"' in text and "sunny, 21 C" in text and "<tool_call>" in text


def test_tool_rows_are_row_errors_under_a_template_without_tools(tmp_path, family_model, caplog):
    proj = Proj(tmp_path, family_model("phi3.5"))
    proj.jsonl("in.jsonl", _rows(6, 4))
    proj.config(extra="  errors_shown: 2\n")
    with caplog.at_level("WARNING"):
        result = proj.stage("preprocess.val_fraction=0")
    assert result.metrics["rows_kept"] == 6 and result.metrics["dropped_invalid"] == 4
    assert all("tools" not in r and len(r["messages"]) == 2 for r in proj.out("train"))
    errors = proj.metadata()["errors"]
    assert errors["count"] == 4
    assert errors["first"][0] == (
        "data/in.jsonl:7: messages: the chat template rejects this conversation: it does not render tool "
        "definitions or tool calls (the tool turns would train empty): use a model whose chat template supports "
        "tools, set preprocess.tools_fallback=text, or remove the row's tools"
    )
    shown = [r.getMessage() for r in caplog.records if "does not render tool" in r.getMessage()]
    assert len(shown) == 2  # capped like every row warning; all 4 counted


@pytest.mark.slow
def test_only_tool_rows_under_a_template_without_tools_is_exit_2(tmp_path, family_model):
    proj = Proj(tmp_path, family_model("phi3.5"))
    proj.jsonl("in.jsonl", _rows(0, 3))
    result = proj.cli()
    assert result.code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: data/in.jsonl: no usable rows (3 read; dropped: 3 invalid (first: data/in.jsonl:1 messages)) "
                      "(next: fix the rows named above, or check --format)"], result.stderr
    assert "data/in.jsonl:1: messages: the chat template rejects this conversation: it does not render" in result.stderr
