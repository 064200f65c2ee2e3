"""`ftpipe check-template`: exit codes, the table, the JSON, per family (real tokenizers and templates)."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import run_cli

# What each tiny family shows: its Ollama family; every consumer agrees (BOS as released: Llama 3.1
# and Mistral add it and their templates write it, which llama.cpp's chat code drops before adding
# its own; Gemma 4's template writes it and llama.cpp's converter forces add_bos on; Qwen and
# Phi-3.5 have none).
EXPECTED = {
    "qwen2.5": ("qwen2.5", True, set()),
    "qwen3": ("chatml", True, set()),
    "llama3": ("llama3.1", True, set()),
    "phi3.5": ("phi3", True, set()),
    "mistral": ("mistral-nemo", True, set()),
    "gemma": ("gemma4", True, set()),
}
PARAMS = [pytest.param(n, marks=pytest.mark.slow) if n == "gemma" else n for n in sorted(EXPECTED)]


@pytest.mark.parametrize("name", PARAMS)
def test_check_template_per_family(family_model, name):
    family, agree, differing = EXPECTED[name]
    result = run_cli("check-template", "--model", str(family_model(name)), "--json")
    assert result.code == (0 if agree else 1), result.output
    data = json.loads(result.stdout)
    assert data["family"] == family and data["agree"] is agree
    rows = data["rows"]
    conversations = {r["conversation"] for r in rows}
    assert {"no-system", "system", "multi-turn"} <= conversations
    assert ("tools" in conversations) == (name != "phi3.5")  # Phi-3.5's template has no tool format
    assert {r["consumer"] for r in rows if r["status"] == "differs"} == differing
    assert all(r["status"] == "same" for r in rows if r["consumer"] == "vllm")
    tools_ollama = [r for r in rows if r["conversation"] == "tools" and r["consumer"] == "ollama"]
    assert all(r["status"] == "refused" and "no tools in Ollama" in r["detail"] for r in tools_ollama)


def test_a_bos_training_never_saw_is_shown(family_model, tmp_path):
    """Phi-3.5's template writes no <s>; a tokenizer that adds one anyway makes llama.cpp and Ollama
    start every prompt with a BOS training never had: both rows differ at token 0, exit 1."""
    model = tmp_path / "m"
    shutil.copytree(family_model("phi3.5"), model)
    data = json.loads((model / "tokenizer.json").read_text(encoding="utf-8"))
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
    }
    (model / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    result = run_cli("check-template", "--model", str(model), "--json")
    assert result.code == 1, result.output
    out = json.loads(result.stdout)
    differing = [r for r in out["rows"] if r["status"] == "differs"]
    assert {r["consumer"] for r in differing} == {"gguf", "ollama"}
    assert all(r["detail"].startswith("differs at token 0: [1, ") for r in differing), differing


def test_table_and_exit_1_when_the_go_side_differs(family_model, tmp_path):
    """A ChatML template that renders one character differently from every Go template: the Ollama
    rows differ (with the first differing character), the others agree; exit 1."""
    model = tmp_path / "m"
    shutil.copytree(family_model("qwen3"), model)
    template = (model / "chat_template.jinja").read_text(encoding="utf-8")
    mutated = template.replace("{{- '<|im_start|>assistant\\n' }}", "{{- '<|im_start|>assistant:\\n' }}")
    assert mutated != template
    (model / "chat_template.jinja").write_text(mutated, encoding="utf-8")
    result = run_cli("check-template", "--model", str(model))
    assert result.code == 1, result.output
    assert "some consumers differ" in result.stdout
    assert "Ollama: " in result.stdout and "renders the no-system conversation differently" in result.stdout
    data = json.loads(run_cli("check-template", "--model", str(model), "--json").stdout)
    assert {r["consumer"] for r in data["rows"] if r["status"] == "differs"} == {"ollama"}


def test_agreeing_model_prints_a_table_and_exits_0(family_model):
    result = run_cli("check-template", "--model", str(family_model("qwen2.5")))
    assert result.code == 0, result.output
    for word in ("conversation", "training", "vllm", "gguf", "ollama", "reference", "all consumers agree"):
        assert word in result.stdout


def test_missing_folder_exits_2(tmp_path):
    result = run_cli("check-template", "--model", str(tmp_path / "nope"))
    assert result.code == 2
    assert f"error: {tmp_path / 'nope'}: no such model folder" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_no_chat_template_exits_2(family_model, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(family_model("qwen2.5"), model)
    (model / "chat_template.jinja").unlink()
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    result = run_cli("check-template", "--model", str(model))
    assert result.code == 2, result.output
    assert f"error: {model}: the tokenizer has no chat template" in result.stderr


def test_help_states_the_exit_codes():
    result = run_cli("check-template", "--help")
    assert result.code == 0
    assert "Exit 0 when every consumer agrees, 1 when some differ, 2 for bad input" in " ".join(result.stdout.split())
