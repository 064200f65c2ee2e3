"""The six model families (`ftpipe make-tiny-model --family`) through export-merged, export-gguf,
convert-awq and eval-sft: every cell either works (checked here independently of the stage's own
checks) or is refused in one line naming the family's architecture or tokenizer and the stage.

Each family's run is a real peft LoRA (nonzero B) on the family's tiny model (real tokenizer and
chat template, 2 layers, width 128), merged once per module. What each family does per stage
(docs/families.md):

| family  | export-merged | export-gguf                              | convert-awq              | eval-sft |
|---------|---------------|------------------------------------------|--------------------------|----------|
| llama3  | ok (untied)   | ok                                       | pre-flight ok            | ok       |
| qwen2.5 | ok (tied)     | ok                                       | pre-flight ok            | ok       |
| qwen3   | ok (tied)     | ok                                       | pre-flight ok            | ok       |
| phi3.5  | ok (untied)   | ok                                       | ok (real AWQ, slow test) | ok (+awq)|
| mistral | ok (untied)   | ok                                       | pre-flight ok            | ok       |
| gemma   | ok (tied)     | ok                                       | refused: no AWQ mapping  | ok       |
|         |               |                                          | for Gemma4ForCausalLM    |          |

export-gguf's pre-flight refusals (a tokenizer.model SentencePiece cannot load, a Metaspace
"first" pre-tokenizer llama.cpp splits differently) are tested on deliberately broken copies.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/export/test_families_export.py
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import FAMILY_NAMES, run_cli
from tests.export.conftest import REPO, fabricate_finetune, make_project

AWQ_REFUSED = {"gemma": "Gemma4ForCausalLM"}
# Text with every kind of token a chat holds: non-ASCII, whitespace runs, special tokens in text.
PROBE = "Grüße, 你好 🙂\n\n  two spaces\tand a tab. {eot}\nNext: ñandú {eot} done"


@pytest.fixture(scope="module")
def family_run(tmp_path_factory, family_model):
    """`family_run(name)`: a project whose run r1 holds a real LoRA adapter on the family's tiny
    model and a completed export-merged (built once per module)."""
    from ftpipe.config import load_config
    from ftpipe.stages import run_stage

    runs: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in runs:
            root = make_project(tmp_path_factory.mktemp(f"proj-{name}"), family_model(name))
            (root / ".venv-awq").symlink_to(REPO / ".venv-awq", target_is_directory=True)
            with open(root / "config.yaml", "a", encoding="utf-8") as fh:
                fh.write("eval:\n  max_new_tokens: 4\n  samples: 1\n")
            fabricate_finetune(root)
            result = run_stage("export-merged", load_config(root / "config.yaml"), "r1")
            assert result.manifest["status"] == "completed"
            runs[name] = root
        return runs[name]

    return get


def _fam(name):
    from ftpipe.training.families import family

    return family(name)


def _end_of_turn_ids(name: str, folder: Path) -> list[int]:
    from transformers import AutoTokenizer

    from ftpipe.training.families import end_of_turn_ids

    return end_of_turn_ids(_fam(name), AutoTokenizer.from_pretrained(folder))


@pytest.mark.slow  # builds the family's model and merges (about a minute each on 2 busy cores)
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_export_merged_per_family(name, family_run, family_model):
    """Merged logits equal base + adapter (recomputed here), ties kept as the family ships them,
    every tokenizer file of the base carried, generation_config stops at every end-of-turn id."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    root, base_dir = family_run(name), family_model(name)
    merged = root / "outputs/r1/merged"
    m = json.loads((root / "logs/r1/export-merged/manifest.json").read_text())["metrics"]
    assert m["tied_embeddings"] is _fam(name).tied
    assert m["max_abs_logit_diff"] <= 1e-3

    base_tok, tok = AutoTokenizer.from_pretrained(base_dir), AutoTokenizer.from_pretrained(merged)
    for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja"):
        assert (merged / f).is_file() == (base_dir / f).is_file(), f
    if (base_dir / "tokenizer.model").is_file():
        assert (merged / "tokenizer.model").read_bytes() == (base_dir / "tokenizer.model").read_bytes()
    assert tok.chat_template == base_tok.chat_template
    eot = base_tok.convert_ids_to_tokens(_end_of_turn_ids(name, base_dir)[0])
    text = PROBE.format(eot=eot)
    assert tok(text, add_special_tokens=False)["input_ids"] == base_tok(text, add_special_tokens=False)["input_ids"]
    eos = GenerationConfig.from_pretrained(merged).eos_token_id
    assert sorted(eos if isinstance(eos, list) else [eos]) == sorted(_end_of_turn_ids(name, base_dir))
    assert tok.eos_token_id in _end_of_turn_ids(name, base_dir)

    conv = [{"role": "user", "content": "Label: dull."}, {"role": "assistant", "content": "negative"}]
    ids = base_tok(base_tok.apply_chat_template(conv, tokenize=False) + text, add_special_tokens=False,
                   return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                        root / "outputs/r1/adapter")(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)(input_ids=ids).logits
        got_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
        got = got_model(input_ids=ids).logits
    assert float((ref - plain).abs().max()) > 1e-3  # the adapter changes the outputs
    assert float((ref - got).abs().max()) < 1e-3
    assert bool(got_model.config.tie_word_embeddings) is _fam(name).tied
    if _fam(name).tied:
        assert got_model.get_input_embeddings().weight.data_ptr() == got_model.get_output_embeddings().weight.data_ptr()


GGUF_READ = r"""
import json, sys
import llama_cpp
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=64, verbose=False, vocab_only=True)
ids = json.loads(sys.argv[2])
print(json.dumps({"template": llm.metadata.get("tokenizer.chat_template"),
                  "eos": llm.token_eos(), "eot": llm._model.token_eot(),
                  "eog": [i for i in ids if llama_cpp.llama_vocab_is_eog(llm._model.vocab, i)],
                  "probe": llm.tokenize(sys.argv[3].encode(), add_bos=False, special=True)}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_export_gguf_per_family(name, family_run):
    """The converter recognises the family's tokenizer; the GGUF tokenizes like HF (the stage's
    probe texts, and one more here), holds the chat template, EOS = the template's end-of-turn and
    every end-of-turn id is an end-of-generation token in llama.cpp."""
    from transformers import AutoTokenizer

    root = family_run(name)
    result = run_cli("export-gguf", "--config", str(root / "config.yaml"), "--run", "r1",
                     "--set", "gguf.outtypes=[f16]", cwd=root)
    assert result.code == 0, result.output
    m = json.loads((root / "logs/r1/export-gguf/manifest.json").read_text())["metrics"]
    assert m["f16_tokenization_equal"] is True and m["f16_tokenization_texts"] >= 10
    assert m["f16_chat_template_roundtrip_equal"] is True  # greedy: enforced by the stage (near-ties allowed)

    merged = root / "outputs/r1/merged"
    tok = AutoTokenizer.from_pretrained(merged)
    eots = _end_of_turn_ids(name, merged)
    text = PROBE.format(eot=tok.convert_ids_to_tokens(eots[0]))
    out = subprocess.run([REPO / ".venv-gguf/bin/python", "-c", GGUF_READ, root / "outputs/r1/gguf/model-f16.gguf",
                          json.dumps(eots), text], capture_output=True, text=True, check=True)
    meta = json.loads(out.stdout.strip().splitlines()[-1])
    assert meta["template"] == (merged / "chat_template.jinja").read_text()
    assert meta["eos"] == tok.eos_token_id and meta["eos"] in eots
    assert meta["eog"] == eots
    assert meta["probe"] == tok(text, add_special_tokens=False)["input_ids"]


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


@pytest.mark.slow  # the family's merged run
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_convert_awq_preflight_per_family(name, family_run):
    """Families with an llm-compressor AWQ mapping pass the pre-flight; Gemma 4 is refused in one
    line naming the architecture, the stage and the artifacts to use instead."""
    from ftpipe.config import load_config
    from ftpipe.core.errors import InputError
    from ftpipe.stages import BY_NAME, prepare

    root = family_run(name)
    if name not in AWQ_REFUSED:
        ctx, inputs = prepare(BY_NAME["convert-awq"], load_config(root / "config.yaml"), "r1")
        assert inputs["merged"].name == "manifest.json"
        return
    with pytest.raises(InputError, match=AWQ_REFUSED[name]):
        prepare(BY_NAME["convert-awq"], load_config(root / "config.yaml"), "r1")
    result = run_cli("convert-awq", "--config", str(root / "config.yaml"), "--run", "r1", cwd=root)
    assert result.code == 2, result.output
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: convert-awq: architecture Gemma4ForCausalLM"), result.stderr
    assert "--artifact merged" in lines[0] and "ftpipe export-gguf" in lines[0]
    assert not (root / "outputs/r1/awq").exists()


@pytest.mark.slow
def test_convert_awq_phi3_fused_projections(family_run):
    """A real AWQ run on Phi-3 (fused qkv_proj / gate_up_proj: llm-compressor's Phi mappings)."""
    root = family_run("phi3.5")
    result = run_cli("convert-awq", "--config", str(root / "config.yaml"), "--run", "r1",
                     "--set", "awq.calibration_samples=3", cwd=root)
    assert result.code == 0, result.output
    m = json.loads((root / "logs/r1/convert-awq/manifest.json").read_text())["metrics"]
    assert m["quant_method"] == "compressed-tensors" and m["size_ratio_vs_fp16"] < 1.0
    config = json.loads((root / "outputs/r1/awq/config.json").read_text())
    assert config["architectures"] == ["Phi3ForCausalLM"]
    assert (root / "outputs/r1/awq/tokenizer.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_eval_sft_per_family(name, family_run):
    """eval-sft measures base, adapter and merged of every family; merged == adapter (faithful merge)."""
    from ftpipe.config import load_config
    from ftpipe.stages import run_stage

    root = family_run(name)
    result = run_stage("eval-sft", load_config(root / "config.yaml"), "r1")
    assert result.manifest["status"] == "completed"
    arts = json.loads((root / "outputs/r1/eval/metrics.json").read_text())["artifacts"]
    for art in ("base", "adapter", "merged"):
        assert arts[art]["status"] == "ok", arts[art]
        assert arts[art]["perplexity"] > 1.0 and arts[art]["assistant_tokens"] > 0
    # AWQ: measured in the awq environment when convert-awq ran for this run (phi3.5 above), else skipped.
    made_awq = (root / "outputs/r1/awq/config.json").is_file()
    assert arts["awq"]["status"] == ("ok" if made_awq else "skipped"), arts["awq"]
    if made_awq:
        assert arts["awq"]["perplexity"] > 1.0 and arts["awq"]["environment"] == "awq"
    assert abs(arts["merged"]["perplexity"] - arts["adapter"]["perplexity"]) < 1e-3 * arts["adapter"]["perplexity"]
    assert arts["base"]["perplexity"] != arts["adapter"]["perplexity"]
    gens = [json.loads(line) for line in (root / "outputs/r1/eval/generations.jsonl").read_text().splitlines()]
    assert gens


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
