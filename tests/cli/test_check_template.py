"""`ftpipe check-template`: exit codes, the table, the JSON, per family (real tokenizers and templates)."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import run_cli

# What each tiny family shows (the tiny models' tokenizers as make-tiny-model builds them):
# Ollama family, whether every consumer agrees, the rows that differ.
EXPECTED = {
    "qwen2.5": ("qwen2.5", True, set()),
    "qwen3": ("chatml", True, set()),
    # The tokenizer adds no BOS while the template writes it: Ollama (BOS aside + tokenizer's rule) lacks it.
    "llama3": ("llama3.1", False, {"ollama"}),
    # The template writes no BOS while the tokenizer adds one: GGUF and Ollama start with BOS, training does not.
    "phi3.5": ("phi3", False, {"gguf", "ollama"}),
    # The template writes <s> and the tokenizer adds BOS: GGUF gets a double BOS.
    "mistral": ("mistral-nemo", False, {"gguf", "ollama"}),
    "gemma": ("gemma4", False, {"ollama"}),
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
    if name == "mistral":
        assert all("(double BOS)" in r["detail"] for r in rows if r["consumer"] == "gguf")


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
