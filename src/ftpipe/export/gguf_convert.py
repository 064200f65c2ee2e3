"""Run llama.cpp's `convert_hf_to_gguf.py` unchanged, recognising self-trained byte-level BPE tokenizers.

The converter identifies a BPE tokenizer's pre-tokenizer by hashing how it splits a probe string
and refuses any hash it does not know ("BPE pre-tokenizer was not recognized"). A tokenizer
trained locally with `tokenizers` (ByteLevel pre-tokenizer with the GPT-2 regex, no normalizer)
has a new hash but *is* the GPT-2 pre-tokenizer, so this wrapper answers "gpt-2" for exactly that
case (and "qwen2" / "llama-bpe" for a Split + ByteLevel pipeline with exactly those families'
regexes, which transformers writes for qwen2 / llama-3 tokenizers) and re-raises otherwise.
It also types the added tokens tokenizer.json marks special as control tokens where gguf's
LlamaHfVocab would not (`added_special_tokens`), and fills in the full-attention head size of a Gemma 4 config that transformers saved without
one (`fill_gemma4_full_head_dim`).
export-gguf then checks that llama.cpp tokenizes sample prompts exactly like HF. The vendored converter file is not edited: the fallback is added
by wrapping `TextModel.get_vocab_base_pre` before the converter's own `main()` runs.

Called by the export-gguf stage (ftpipe/export/export_gguf.py) as a subprocess:

    python -m ftpipe.export.gguf_convert LLAMA_CPP_DIR MODEL_DIR --outfile out.gguf --outtype f16

It logs like every ftpipe worker (`ftpipe.core.logs.worker_logging`), to stderr only: the stage
copies that to logs/<run>/export-gguf/convert.log (the converter logs every tensor: too much for
run.log).
"""

from __future__ import annotations

import json
import logging
import re
import runpy
import sys
from pathlib import Path

log = logging.getLogger("ftpipe.gguf_convert")


# Split regexes of byte-level BPE pipelines -> llama.cpp pre-tokenizer names. transformers
# (the versions: docs/gguf-ollama.md) re-creates a model family's own pipeline on load (a qwen2 model's tokenizer is saved as
# Split(Qwen2 regex) + ByteLevel(use_regex=False) + NFC, whatever tokenizer.json said before).
KNOWN_SPLIT_REGEXES = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
}


def byte_level_pre(model_dir: Path) -> str | None:
    """The llama.cpp pre-tokenizer of a byte-level BPE tokenizer.json whose split rule is known:
    a plain ByteLevel pre-tokenizer (GPT-2 regex, no normalizer) is "gpt-2"; Split(known regex) +
    ByteLevel(use_regex=False) is that regex's name. None otherwise."""
    try:
        data = json.loads((Path(model_dir) / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (data.get("model") or {}).get("type") != "BPE":
        return None
    pre = data.get("pre_tokenizer") or {}
    normalizer = data.get("normalizer")
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) is True and normalizer is None:
        return "gpt-2"
    parts = pre.get("pretokenizers") or []
    if (
        pre.get("type") == "Sequence"
        and len(parts) == 2
        and parts[0].get("type") == "Split"
        and parts[1].get("type") == "ByteLevel"
        and parts[1].get("use_regex") is False
        and normalizer in (None, {"type": "NFC"})
    ):
        return KNOWN_SPLIT_REGEXES.get((parts[0].get("pattern") or {}).get("Regex"))
    return None


def fill_gemma4_full_head_dim(hparams: dict) -> bool:
    """Give a Gemma 4 config the full-attention head size in the key the converter reads.

    transformers (docs/gguf-ollama.md) saves a Gemma 4 config as `per_layer_config` holding only the overrides of the
    full-attention layers; when their head size equals `head_dim` there is no override, so the
    saved config has neither `global_head_dim` nor a per-layer `head_dim` (transformers reads that
    as "full-attention layers use head_dim"). llama.cpp's converter then asserts. This sets
    `global_head_dim = head_dim` for exactly that case; True when it did.
    """
    if hparams.get("global_head_dim") is not None or hparams.get("head_dim") is None:
        return False
    per_layer = hparams.get("per_layer_config")
    if per_layer is None:
        return False  # an older config layout: leave it to the converter
    types = hparams.get("layer_types") or []
    for index, layer in per_layer.items():
        if int(index) < len(types) and types[int(index)] == "full_attention" and "head_dim" in layer:
            return False
    hparams["global_head_dim"] = hparams["head_dim"]
    return True


def added_special_tokens(model_dir: Path) -> dict[str, int]:
    """The added tokens tokenizer.json marks `special` (content -> id): HF splits text on them and
    treats them as control tokens, whether or not tokenizer_config.json names them."""
    try:
        data = json.loads((Path(model_dir) / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {t["content"]: int(t["id"]) for t in data.get("added_tokens") or [] if t.get("special")}


# llama.cpp (llama-vocab.cpp) strips the whitespace after the special tokens of a vocabulary whose
# general.name contains "phi-3" or "phi3" (lower-cased), all but these: Phi-3's released tokenizer.json
# marks exactly those added tokens rstrip. Nothing else in a GGUF carries that setting.
PHI3_NAME = re.compile(r"phi-?3", re.IGNORECASE)
PHI3_NOT_STRIPPED = ("<unk>", "<s>", "<|endoftext|>")


def name_for_llama_cpp(name: str | None, model_dir: Path) -> str | None:
    """A general.name under which llama.cpp strips whitespace after special tokens exactly where
    tokenizer.json does; None when `name` already agrees.

    The converter names a GGUF after the folder when nothing else names it, so `export-gguf --from
    models/phi3` wrote "Phi3", and llama.cpp then read "<|user|>\nHi" as "<|user|>Hi" while the model
    was trained on the newline. Such a name loses the trigger ("phi3" -> "phi 3") when no special
    token of tokenizer.json is rstrip; a tokenizer that does strip (Phi-3's released one) is left to
    the converter's name, and export-gguf's tokenization check says whether llama.cpp agrees.
    """
    if not name or not PHI3_NAME.search(name):
        return None
    try:
        data = json.loads((Path(model_dir) / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    strips = any(t.get("rstrip") for t in data.get("added_tokens") or []
                 if t.get("special") and t.get("content") not in PHI3_NOT_STRIPPED)
    return None if strips else PHI3_NAME.sub(lambda m: m.group(0)[:3] + " 3", name)


def main(argv: list[str]) -> None:
    llama_cpp_dir, model_dir = Path(argv[0]), Path(argv[1])
    sys.path.insert(0, str(llama_cpp_dir / "gguf-py"))  # the converter must use its own gguf-py
    sys.path.insert(0, str(llama_cpp_dir))
    import gguf
    from conversion.base import TextModel

    original = TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            pre = byte_level_pre(self.dir_model)
            if pre is None:
                raise
            log.warning("unknown BPE pre-tokenizer hash; tokenizer.json is byte-level BPE with a known split rule: using %r", pre)
            return pre

    TextModel.get_vocab_base_pre = get_vocab_base_pre

    original_set_meta = gguf.Metadata.set_gguf_meta_model

    def set_gguf_meta_model(self, gguf_writer) -> None:
        renamed = name_for_llama_cpp(self.name, model_dir)
        if renamed is not None:
            log.warning("general.name %r would make llama.cpp strip the whitespace after special tokens, which "
                        "tokenizer.json keeps: named %r", self.name, renamed)
            self.name = renamed
        original_set_meta(self, gguf_writer)

    gguf.Metadata.set_gguf_meta_model = set_gguf_meta_model

    # gguf's LlamaHfVocab (Gemma 4, and Llama-style models without tokenizer.model) types a token
    # CONTROL only when transformers lists it in all_special_ids (the *named* special tokens): a
    # chat token such as Gemma 4's <|turn>, special in tokenizer.json but unnamed, became a NORMAL
    # token, which llama.cpp then spells out as text ("<", "|", "turn", ">") when a prompt holds
    # it. The tokens tokenizer.json marks special are added to its special set.
    original_vocab_init = gguf.LlamaHfVocab.__init__

    def vocab_init(self, base_path: Path, *args, **kwargs) -> None:
        original_vocab_init(self, base_path, *args, **kwargs)
        extra = {tok: i for tok, i in added_special_tokens(base_path).items() if i not in self.special_ids}
        if extra:
            log.info("tokenizer.json marks %d more added tokens special (e.g. %s): typed CONTROL",
                     len(extra), ", ".join(list(extra)[:4]))
            self.special_ids |= set(extra.values())
            self.specials.update(extra)

    gguf.LlamaHfVocab.__init__ = vocab_init

    from conversion.gemma import Gemma4Model

    original_init = Gemma4Model.__init__

    def gemma4_init(self, *args, **kwargs) -> None:
        original_init(self, *args, **kwargs)
        if fill_gemma4_full_head_dim(self.hparams):
            log.warning("Gemma 4 config without a full-attention head size override: global_head_dim = head_dim = %s",
                        self.hparams["head_dim"])

    Gemma4Model.__init__ = gemma4_init
    sys.argv = [str(llama_cpp_dir / "convert_hf_to_gguf.py"), str(model_dir), *argv[2:]]
    runpy.run_path(str(llama_cpp_dir / "convert_hf_to_gguf.py"), run_name="__main__")


if __name__ == "__main__":
    from ftpipe.core.logs import worker_logging

    # Before the converter's own logging.basicConfig, which then leaves these handlers in place.
    worker_logging(None, prefix="[gguf_convert] ")
    main(sys.argv[1:])
