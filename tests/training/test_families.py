"""`make-tiny-model --family`: each family's architecture, REAL tokenizer, chat template and special
tokens, from llama.cpp's vocabularies and templates (the pinned llama-cpp-python sdist)."""

from __future__ import annotations

import json
import re
import typing

import pytest

from conftest import FAMILY_NAMES, REPO, run_cli
from ftpipe.core.config import TinyModelConfig
from ftpipe.training import families

# What each family's released tokenizer does, checked against the built one (ids as published).
EXPECTED = {
    "llama3": {"class": "LlamaForCausalLM", "vocab": 128256, "tied": False, "bos": 128000, "eot": 128009,
               "pad": 128004, "tokens": {"<|eom_id|>": 128008, "<|python_tag|>": 128010}},
    "qwen2.5": {"class": "Qwen2ForCausalLM", "vocab": 151936, "tied": True, "bos": None, "eot": 151645,
                "pad": 151643, "tokens": {"<tool_call>": 151657, "</tool_call>": 151658}},
    "qwen3": {"class": "Qwen3ForCausalLM", "vocab": 151936, "tied": True, "bos": None, "eot": 151645,
              "pad": 151643, "tokens": {"<think>": 151667, "</think>": 151668, "<tool_response>": 151665}},
    "phi3.5": {"class": "Phi3ForCausalLM", "vocab": 32064, "tied": False, "bos": 1, "eot": 32007, "pad": 0,
               "tokens": {"<|user|>": 32010, "<|assistant|>": 32001}},
    "mistral": {"class": "MistralForCausalLM", "vocab": 32000, "tied": False, "bos": 1, "eot": 2, "pad": 0,
                "tokens": {}},
    "gemma": {"class": "Gemma4ForCausalLM", "vocab": 262144, "tied": True, "bos": 2, "eot": 106, "pad": 0,
              "tokens": {"<|turn>": 105}},
}


def test_pinned_sdist_is_the_gguf_lock_version() -> None:
    lock = (REPO / "requirements/gguf.lock").read_text()
    assert f"llama_cpp_python=={families.LLAMA_CPP_PYTHON}" in lock.replace("-", "_")


def test_config_choices_are_the_family_table() -> None:
    choices = typing.get_args(typing.get_args(TinyModelConfig.model_fields["family"].annotation)[0])
    assert set(choices) == set(families.FAMILIES) == set(FAMILY_NAMES)


def test_unknown_family_is_one_line() -> None:
    result = run_cli("make-tiny-model", "--family", "falcon9", "--out", "/nonexistent/x")
    assert result.code == 2
    assert result.stderr.count("\n") == 1 and "--family" in result.stderr
    assert all(name in result.stderr for name in FAMILY_NAMES)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_family_model_is_the_real_family(name: str, family_model) -> None:
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    folder = family_model(name)
    want = EXPECTED[name]
    config = AutoConfig.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    gen = GenerationConfig.from_pretrained(folder)
    assert config.architectures == [want["class"]]
    assert config.vocab_size == len(tok) == want["vocab"]
    assert config.tie_word_embeddings is want["tied"]
    assert tok.bos_token_id == want["bos"] == config.bos_token_id
    assert tok.pad_token_id == want["pad"] == config.pad_token_id
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    assert eos[0] == want["eot"], (name, eos)
    # Padding never hides the end-of-turn token (Qwen's pad <|endoftext|> is a second stop, as released).
    assert tok.pad_token_id not in (tok.eos_token_id, eos[0])
    for token, token_id in want["tokens"].items():
        assert tok.convert_tokens_to_ids(token) == token_id
        assert tok(token, add_special_tokens=False)["input_ids"] == [token_id]
    template = (folder / "chat_template.jinja").read_text()
    fam = families.FAMILIES[name]
    source = REPO / families.CACHE_DIR / f"llama.cpp-{families.LLAMA_CPP_PYTHON}/models/templates/{fam.template}.jinja"
    assert template == source.read_text(), "the chat template must be the released one, unchanged"
    # The tokenizer is the real one: non-ASCII text round-trips, and common words are one token each.
    text = "Grüße, naïve café — 日本語 ok"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert len(tok("the cat", add_special_tokens=False)["input_ids"]) == 2
    assert (folder / "tokenizer.model").is_file() == (name in ("phi3.5", "mistral"))
    # BOS added when encoding exactly where the released tokenizer adds it, and said so in
    # tokenizer_config.json (where llama.cpp's converter reads it).
    adds_bos = name in ("llama3", "mistral")
    assert (tok("a")["input_ids"][0] == tok.bos_token_id) is adds_bos
    assert json.loads((folder / "tokenizer_config.json").read_text())["add_bos_token"] is adds_bos
    assert "model.safetensors" in {p.name for p in folder.iterdir()}


def test_sentencepiece_model_matches_the_fast_tokenizer(family_model) -> None:
    """tokenizer.model (what llama.cpp's Phi-3 converter reads) holds the same pieces and ids."""
    from transformers import AutoTokenizer
    from transformers.utils import sentencepiece_model_pb2_new as pb

    folder = family_model("phi3.5")
    tok = AutoTokenizer.from_pretrained(folder)
    model = pb.ModelProto()
    model.ParseFromString((folder / "tokenizer.model").read_bytes())
    # The base vocabulary only (as released): <|endoftext|> and the chat tokens from 32000 on are
    # added tokens of tokenizer.json; one UNKNOWN piece (SentencePiece loads nothing else).
    assert len(model.pieces) == 32000 < len(tok)
    vocab = tok.get_vocab()
    for i in (0, 1, 2, 3, 259, 1000, 31999):
        assert vocab[model.pieces[i].piece] == i
    kinds = [p.type for p in model.pieces]
    assert kinds[:3] == [2, 3, 3] and kinds.count(2) == 1 and kinds[3:259] == [6] * 256


def test_material_is_fetched_once_and_cached(family_model) -> None:
    family_model("mistral")
    models = REPO / families.CACHE_DIR / f"llama.cpp-{families.LLAMA_CPP_PYTHON}/models"
    assert (models / "FTPIPE_COMPLETE").is_file()
    have = families.available(REPO)
    assert {f.vocab for f in families.FAMILIES.values()} <= set(have["vocabularies"])
    assert {f.template for f in families.FAMILIES.values()} <= set(have["templates"])
    assert len(have["templates"]) >= 60


def test_cli_builds_a_family(tmp_path) -> None:
    out = tmp_path / "m"
    result = run_cli("make-tiny-model", "--family", "mistral", "--out", str(out), "--num-layers", "1")
    assert result.code == 0, result.output
    assert re.search(r"tiny mistral \(MistralForCausalLM\) model", result.stdout)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1
