"""Model families with REAL tokenizers and chat templates, and no hub (`make-tiny-model --family`).

llama.cpp ships real vocabularies as vocab-only GGUF files (`models/ggml-vocab-*.gguf`) and the
chat templates of ~70 released models (`models/templates/*.jinja`). llama-cpp-python's source
distribution, pinned in `requirements/gguf.lock`, vendors llama.cpp; this module fetches that sdist
from the package registry once (`pip download --no-deps --no-binary :all:`), extracts only the
vocabularies and templates into the project's cache (`.cache/ftpipe/llama.cpp-<version>/`), and
builds a transformers tokenizer from a vocabulary with transformers' own GGUF reader.

A vocab GGUF holds the family's *base* vocabulary. Where the instruct models put more special
tokens at fixed ids (Llama 3.1: `<|eom_id|>`, `<|python_tag|>`, `<|finetune_right_pad_id|>`;
Qwen2.5 / Qwen3: `<tool_call>`, `<think>`...), the family's `renames` put them at their published
ids, where the GGUF has reserved or padding entries; nothing else in the vocabulary changes.

    ftpipe make-tiny-model --family qwen2.5 --out models/tiny-qwen2.5
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ftpipe.core.errors import InputError, StageError
from ftpipe.core.fsutil import exclusive
from ftpipe.handoff import spm

log = logging.getLogger(__name__)

# The llama-cpp-python sdist the material comes from: the version requirements/gguf.lock pins
# (tests/training/test_families.py checks that the two agree).
LLAMA_CPP_PYTHON = "0.3.36"
CACHE_DIR = Path(".cache") / "ftpipe"

_QWEN25_EXTRA = {
    151646: "<|object_ref_start|>", 151647: "<|object_ref_end|>", 151648: "<|box_start|>",
    151649: "<|box_end|>", 151650: "<|quad_start|>", 151651: "<|quad_end|>", 151652: "<|vision_start|>",
    151653: "<|vision_end|>", 151654: "<|vision_pad|>", 151655: "<|image_pad|>", 151656: "<|video_pad|>",
    151657: "<tool_call>", 151658: "</tool_call>", 151659: "<|fim_prefix|>", 151660: "<|fim_middle|>",
    151661: "<|fim_suffix|>", 151662: "<|fim_pad|>", 151663: "<|repo_name|>", 151664: "<|file_sep|>",
}
# Tokens of the instruct vocabularies that are special (control) tokens; the others are ordinary
# added tokens (Qwen's <tool_call>, <think>: `special: false` in their tokenizer.json).
_QWEN_CONTROL = {t for t in _QWEN25_EXTRA.values() if t.startswith("<|")}


@dataclass(frozen=True)
class Family:
    """One model family: architecture, vocabulary, chat template and special tokens as it ships."""

    name: str
    architecture: str  # transformers config class
    vocab: str  # models/ggml-vocab-<vocab>.gguf
    template: str  # models/templates/<template>.jinja
    released_as: str  # the model whose template and tokenizer settings these are
    bos: str | None
    eos: str  # the tokenizer's eos_token (what the template writes as `eos_token`)
    end_of_turn: tuple[str, ...]  # every token that ends an assistant turn (generation stops)
    pad: str
    tied: bool
    renames: dict[int, str] = field(default_factory=dict)
    control: frozenset[str] = frozenset()  # renamed tokens that are special (skipped when decoding)
    config: dict = field(default_factory=dict)  # extra config keys of the family
    add_bos: bool | None = None  # the tokenizer adds BOS when encoding text (None: as the vocab file says)
    notes: str = ""


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "llama3", "LlamaConfig", "llama-bpe", "meta-llama-Llama-3.1-8B-Instruct", "Llama-3.1-8B-Instruct",
            bos="<|begin_of_text|>", eos="<|eot_id|>", end_of_turn=("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"),
            pad="<|finetune_right_pad_id|>", tied=False,
            renames={128004: "<|finetune_right_pad_id|>", 128008: "<|eom_id|>", 128010: "<|python_tag|>"},
            control=frozenset({"<|finetune_right_pad_id|>", "<|eom_id|>", "<|python_tag|>"}),
            config={"rope_theta": 500000.0}, add_bos=True,
        ),
        Family(
            "qwen2.5", "Qwen2Config", "qwen2", "Qwen-Qwen2.5-7B-Instruct", "Qwen2.5-Instruct",
            bos=None, eos="<|im_end|>", end_of_turn=("<|im_end|>", "<|endoftext|>"), pad="<|endoftext|>",
            tied=True, renames=_QWEN25_EXTRA, control=frozenset(_QWEN_CONTROL),
            notes="Qwen2.5 0.5B-3B tie their embeddings; 7B and larger do not.",
        ),
        Family(
            "qwen3", "Qwen3Config", "qwen2", "Qwen-Qwen3-0.6B", "Qwen3-0.6B",
            bos=None, eos="<|im_end|>", end_of_turn=("<|im_end|>", "<|endoftext|>"), pad="<|endoftext|>",
            tied=True,
            renames={**_QWEN25_EXTRA, 151665: "<tool_response>", 151666: "</tool_response>",
                     151667: "<think>", 151668: "</think>"},
            control=frozenset(_QWEN_CONTROL), config={"head_dim": 32},
        ),
        Family(
            "phi3.5", "Phi3Config", "phi-3", "microsoft-Phi-3.5-mini-instruct", "Phi-3.5-mini-instruct",
            bos="<s>", eos="<|endoftext|>", end_of_turn=("<|end|>", "<|endoftext|>"), pad="<unk>", tied=False,
            add_bos=False,
            notes="Phi-3.5 ships pad == eos (<|endoftext|>); the tiny model pads with <unk> instead. No BOS is "
            "added: the template writes none, so training, vLLM, the GGUF and Ollama all see the same prompt.",
        ),
        Family(
            "mistral", "MistralConfig", "llama-spm", "mistralai-Mistral-Nemo-Instruct-2407", "Mistral-Nemo-Instruct-2407",
            bos="<s>", eos="</s>", end_of_turn=("</s>",), pad="<unk>", tied=False,
            notes="llama.cpp ships no Mistral vocabulary: this is the 32k SentencePiece vocabulary of Llama 2 "
            "(Mistral 7B v0.1's kind, [INST] as plain text) under the Mistral architecture and Nemo's template.",
        ),
        Family(
            "gemma", "Gemma4TextConfig", "gemma-4", "google-gemma-4-31B-it", "gemma-4-31B-it",
            bos="<bos>", eos="<turn|>", end_of_turn=("<turn|>", "<eos>"), pad="<pad>", tied=True,
            config={"head_dim": 32, "global_head_dim": 32, "hidden_size_per_layer_input": 0,
                    "num_kv_shared_layers": 0, "sliding_window": 512},
        ),
    )
}


def family(name: str) -> Family:
    """The family called `name`.

    Raises:
        InputError: unknown name (the known ones listed).
    """
    try:
        return FAMILIES[name]
    except KeyError:
        raise InputError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}",
                         hint="ftpipe make-tiny-model --family qwen2.5 --out models/tiny-qwen2.5") from None


def material_dir(root: Path) -> Path:
    """The extracted llama.cpp `models/` folder (vocabularies + templates) in the project's cache,
    fetched from the registry on first use.

    Raises:
        StageError: the sdist cannot be downloaded or lacks the expected folder.
    """
    dest = Path(root) / CACHE_DIR / f"llama.cpp-{LLAMA_CPP_PYTHON}" / "models"
    if (dest / "FTPIPE_COMPLETE").is_file():
        return dest
    with exclusive(dest.parent / ".fetch.lock"):  # a second process waits here, then finds it fetched
        if (dest / "FTPIPE_COMPLETE").is_file():
            return dest
        _fetch_material(dest)
    log.info("llama.cpp vocabularies and templates -> %s", dest)
    return dest


def _fetch_material(dest: Path) -> None:
    with tempfile.TemporaryDirectory(dir=dest.parent) as work:
        log.info("fetching the llama-cpp-python %s sdist for real vocabularies and chat templates", LLAMA_CPP_PYTHON)
        argv = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
                "--no-binary", ":all:", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", work]
        done = subprocess.run(argv, capture_output=True, text=True)
        sdist = Path(work) / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
        if done.returncode or not sdist.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise StageError(f"cannot download the llama-cpp-python=={LLAMA_CPP_PYTHON} sdist: {tail[0]}",
                             hint="check access to the package index (pip download llama-cpp-python)")
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/models/"
        wanted = re.compile(re.escape(prefix) + r"(ggml-vocab-[\w.-]+\.gguf|templates/[^/]+\.jinja)$")
        staged = Path(work) / "models"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and wanted.match(m.name)]
            if not members:
                raise StageError(f"{sdist.name} holds no vendor/llama.cpp/models vocabularies")
            for m in members:
                target = staged / m.name[len(prefix):]
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(m) as src, open(target, "wb") as out:
                    out.write(src.read())
        (staged / "FTPIPE_COMPLETE").write_text(f"llama-cpp-python=={LLAMA_CPP_PYTHON} sdist\n", encoding="utf-8")
        if dest.exists():
            import shutil

            shutil.rmtree(dest)
        staged.rename(dest)


def available(root: Path) -> dict[str, list[str]]:
    """What the material holds: vocabularies and chat templates (names without suffix)."""
    models = material_dir(root)
    return {
        "vocabularies": sorted(p.name[len("ggml-vocab-"):-len(".gguf")] for p in models.glob("ggml-vocab-*.gguf")),
        "templates": sorted(p.stem for p in (models / "templates").glob("*.jinja")),
    }


def build_tokenizer(fam: Family, root: Path, max_length: int):
    """The family's real tokenizer (from its vocab GGUF) with its real chat template and tokens.

    The conversion takes seconds for a large vocabulary; its result is kept next to the material
    (`tokenizers/<family>-<spec hash>/`) and reused while the family's row is unchanged.

    Raises:
        StageError: the vocabulary cannot be converted, or a family token is missing.
    """
    from transformers import AutoTokenizer

    models = material_dir(root)
    row = {k: sorted(v) if isinstance(v, frozenset) else v for k, v in vars(fam).items()}
    spec = hashlib.sha256(json.dumps([row, max_length], sort_keys=True, default=str).encode()).hexdigest()[:12]
    cached = models.parent / "tokenizers" / f"{fam.name}-{spec}"
    if not (cached / "tokenizer.json").is_file():
        tokenizer = _convert(fam, models, max_length)
        with tempfile.TemporaryDirectory(dir=models.parent) as work:
            tokenizer.save_pretrained(work)
            cached.parent.mkdir(parents=True, exist_ok=True)
            try:
                Path(work).rename(cached)
                Path(work).mkdir()  # TemporaryDirectory removes it again
            except OSError:  # another process converted it first: theirs is kept
                if not (cached / "tokenizer.json").is_file():
                    raise
    fast = AutoTokenizer.from_pretrained(cached)
    missing = [t for t in (fam.bos, fam.eos, fam.pad, *fam.end_of_turn) if t and fast.convert_tokens_to_ids(t) in (None, fast.unk_token_id)]
    if missing:
        raise StageError(f"family {fam.name}: tokens {missing} are not in ggml-vocab-{fam.vocab}.gguf")
    return fast


def _convert(fam: Family, models: Path, max_length: int):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend, settings = _tokenizer_from_gguf(models / f"ggml-vocab-{fam.vocab}.gguf")
    data = json.loads(backend.to_str())
    # transformers' converter may append a token the family does not have (<|endoftext|> after
    # Llama 3's 128256): the vocabulary is the file's, nothing more.
    size = len(data["model"]["vocab"])
    data["added_tokens"] = [t for t in data.get("added_tokens", []) if t["id"] < size]
    _rename(data, fam)
    # The Llama 2 / Mistral v0.1 tokenizer.json as released: "▁" prepended to every piece of text
    # between special tokens (as SentencePiece and llama.cpp do), not only to the first.
    spm.prepend_per_segment(data)
    tok = Tokenizer.from_str(json.dumps(data))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=fam.bos, eos_token=fam.eos, pad_token=fam.pad,
        unk_token=_unk(data), model_max_length=max_length, clean_up_tokenization_spaces=False,
        add_bos_token=bool(settings.get("add_bos_token") if fam.add_bos is None else fam.add_bos), add_eos_token=False,
    )
    fast.chat_template = (models / "templates" / f"{fam.template}.jinja").read_text(encoding="utf-8")
    return fast


def _tokenizer_from_gguf(path: Path):
    """The `tokenizers` object transformers converts a vocab GGUF into, and the GGUF's tokenizer
    settings (add_bos_token...): transformers' own GGUF reader, tokenizer part only."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer

    architecture, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(str(path))
    backend, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
    return backend, tokenizer_config


def _rename(data: dict, fam: Family) -> None:
    """Put the family's extra tokens at their published ids (in the model vocab and added tokens)."""
    if not fam.renames:
        return
    vocab = data["model"].get("vocab")
    by_id = {t["id"]: t for t in data.get("added_tokens", [])}
    for token_id, content in fam.renames.items():
        old = by_id.get(token_id)
        if isinstance(vocab, dict):
            for key in [k for k, v in vocab.items() if v == token_id]:
                del vocab[key]
            vocab[content] = token_id
        special = content in fam.control
        if old is not None:
            old.update(content=content, special=special, normalized=False)
        else:
            data.setdefault("added_tokens", []).append({
                "id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": special,
            })
    data["added_tokens"].sort(key=lambda t: t["id"])


def _unk(data: dict) -> str | None:
    unk = data["model"].get("unk_token")
    return unk if isinstance(unk, str) else None


def write_sentencepiece_model(fam: Family, root: Path, out: Path) -> bool:
    """Write `tokenizer.model` for a SentencePiece vocabulary (the file the family ships and
    llama.cpp's Phi-3 converter requires), built from the vocab GGUF's pieces, scores and types
    (ftpipe/handoff/spm.py, shared with import-gguf).

    Returns:
        False for a BPE (byte-level) vocabulary: there is no such file to write.
    """
    return spm.write_sentencepiece_model(material_dir(root) / f"ggml-vocab-{fam.vocab}.gguf", out)


def model_config(fam: Family, tokenizer, sizes: dict):
    """The family's transformers config with small sizes and the tokenizer's special-token ids."""
    import transformers

    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in
           (("bos_token_id", fam.bos), ("eos_token_id", fam.eos), ("pad_token_id", fam.pad)) if tok}
    config_cls = getattr(transformers, fam.architecture)
    extra = dict(fam.config)
    if fam.architecture == "Gemma4TextConfig":
        extra["layer_types"] = ["sliding_attention"] * (sizes["num_hidden_layers"] - 1) + ["full_attention"]
    return config_cls(vocab_size=len(tokenizer), tie_word_embeddings=fam.tied, **sizes, **extra, **ids)


def end_of_turn_ids(fam: Family, tokenizer) -> list[int]:
    """Token ids that end a turn (generation_config.eos_token_id), end-of-turn first."""
    return [tokenizer.convert_tokens_to_ids(t) for t in fam.end_of_turn]
