"""Export-stage checks that need a model family but not a whole run: export-gguf's pre-flight
refusals (a tokenizer.model SentencePiece cannot load, a Metaspace "first" pre-tokenizer
llama.cpp splits differently) on deliberately broken copies of a family's tokenizer; ftpipe's list
of AWQ-mapped architectures against llm-compressor's; the converter wrapper's Gemma 4 and
special-token fixes.

Every family through every stage (merged logits recomputed from base + adapter, GGUF metadata and
tokenization, AWQ or its refusal, eval) is the family matrix: tests/e2e/test_family_matrix.py.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/export/test_families_export.py
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.export.conftest import REPO


def _broken_copy(tmp_path: Path, source: Path, how: str) -> Path:
    import shutil

    from transformers.utils import sentencepiece_model_pb2_new as pb

    folder = tmp_path / how
    shutil.copytree(source, folder)
    if how == "two-unknown-pieces":
        model = pb.ModelProto()
        model.ParseFromString((folder / "tokenizer.model").read_bytes())
        model.pieces[3].type = pb.ModelProto.SentencePiece.UNKNOWN
        (folder / "tokenizer.model").write_bytes(model.SerializeToString())
    else:  # transformers' non-legacy Llama-2 pre-tokenizer
        data = json.loads((folder / "tokenizer.json").read_text())
        data["normalizer"] = None
        data["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}
        (folder / "tokenizer.json").write_text(json.dumps(data))
    return folder


@pytest.mark.parametrize("how, words", [("two-unknown-pieces", "tokenizer.model has 2 pieces typed UNKNOWN"),
                                        ("metaspace-first", "Metaspace prepend_scheme 'first'")])
def test_export_gguf_refuses_tokenizers_llama_cpp_reads_differently(tmp_path, family_model, how, words):
    """The pre-flight refuses, in one line naming the stage and the problem, the SentencePiece
    tokenizers llama.cpp cannot load (two UNKNOWN pieces) or would split differently (Metaspace
    prepend_scheme "first": no "▁" after special tokens); the families' own pass it (above)."""
    from ftpipe.core.errors import InputError
    from ftpipe.core.runs import Project
    from ftpipe.export.export_gguf import require_convertible_tokenizer

    def project(root: Path) -> Project:
        return Project(root, root / "prepared", root / "outputs", root / "logs")

    source = family_model("mistral")
    require_convertible_tokenizer(source, project(source.parent))
    folder = _broken_copy(tmp_path, source, how)
    with pytest.raises(InputError) as err:
        require_convertible_tokenizer(folder, project(tmp_path))
    assert words in str(err.value) and str(err.value).startswith("export-gguf:")
    assert "\n" not in str(err.value)


def test_awq_architectures_match_llm_compressor():
    """ftpipe's list of AWQ-mapped architectures (used where llm-compressor is not importable) is
    llm-compressor's, and Gemma 4 still has no mapping there."""
    from ftpipe.export.awq_quality import AWQ_ARCHITECTURES

    code = ("import json; from llmcompressor.modifiers.transform.awq.mappings import AWQ_MAPPING_REGISTRY as R; "
            "from llmcompressor.modifiers.transform.awq.dynamic_mappings import AWQ_DYNAMIC_MAPPING_REGISTRY as D; "
            "print(json.dumps(sorted(set(R) | set(D))))")
    out = subprocess.run([REPO / ".venv-awq/bin/python", "-c", code], capture_output=True, text=True, check=True)
    registry = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert AWQ_ARCHITECTURES <= registry
    assert "Gemma4ForCausalLM" not in registry


def test_gemma4_full_head_dim_filled_only_when_transformers_left_it_out():
    from ftpipe.export.gguf_convert import fill_gemma4_full_head_dim

    saved = {"head_dim": 32, "per_layer_config": {}, "layer_types": ["sliding_attention", "full_attention"]}
    assert fill_gemma4_full_head_dim(saved) and saved["global_head_dim"] == 32
    override = {"head_dim": 32, "per_layer_config": {"1": {"head_dim": 64}}, "layer_types": ["sliding_attention", "full_attention"]}
    assert not fill_gemma4_full_head_dim(override) and "global_head_dim" not in override
    explicit = {"head_dim": 32, "global_head_dim": 512, "per_layer_config": {}}
    assert not fill_gemma4_full_head_dim(explicit) and explicit["global_head_dim"] == 512
    older = {"head_dim": 32}
    assert not fill_gemma4_full_head_dim(older) and "global_head_dim" not in older


def test_added_special_tokens_read_from_tokenizer_json(tmp_path):
    from ftpipe.export.gguf_convert import added_special_tokens

    (tmp_path / "tokenizer.json").write_text(json.dumps({"added_tokens": [
        {"id": 105, "content": "<|turn>", "special": True}, {"id": 7, "content": "<think>", "special": False},
    ]}))
    assert added_special_tokens(tmp_path) == {"<|turn>": 105}
    assert added_special_tokens(tmp_path / "missing") == {}
