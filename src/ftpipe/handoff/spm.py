"""SentencePiece vocabularies in the form llama.cpp's converter reads, rebuilt from a GGUF.

A GGUF whose `tokenizer.ggml.model` is "llama" holds a SentencePiece vocabulary (Llama 2, Mistral
v0.1, Phi-3): pieces, scores and token types. transformers' GGUF reader turns it into a
tokenizer.json only; llama.cpp's converter reads such a vocabulary from `tokenizer.model` (Phi-3's
converter requires it), and reads text the way SentencePiece does: "▁" before every piece of text
between special tokens. Two stages rebuild tokenizers from GGUF vocabularies and use this module:
make-tiny-model's families (training/families.py, llama.cpp's vocab GGUFs) and import-gguf
(ingest/import_gguf.py, the user's GGUF).

    from ftpipe.handoff import spm
    spm.write_sentencepiece_model(Path("model.gguf"), Path("models/m"))  # False for a BPE vocabulary
"""

from __future__ import annotations

from pathlib import Path

SPIECE_UNDERLINE = "\u2581"
# The first pieces of the Llama 2 layout (Llama 2, Mistral v0.1, Phi-3): unknown, BOS, EOS.
LLAMA_SPECIALS = ("<unk>", "<s>", "</s>")


def write_sentencepiece_model(gguf: Path, out: Path) -> bool:
    """Write `out/tokenizer.model` for a SentencePiece vocabulary, built from the GGUF's pieces,
    scores and types (the file the released models ship and llama.cpp's converter reads).

    Returns:
        False for any other vocabulary (byte-level BPE...): there is no such file to write; also
        False for a SentencePiece vocabulary not laid out as Llama 2's (<unk> <s> </s> first).
    """
    from gguf import GGUFReader
    from transformers.utils import sentencepiece_model_pb2_new as pb

    reader = GGUFReader(str(gguf))
    field = reader.fields.get("tokenizer.ggml.model")
    if field is None or field.contents() != "llama":
        return False
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    if list(tokens[:3]) != list(LLAMA_SPECIALS):
        return False  # another layout (Gemma 2/3: <pad> <eos> <bos> <unk>): not the model written below
    scores = reader.fields["tokenizer.ggml.scores"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    model = pb.ModelProto()
    model.trainer_spec.model_type = pb.TrainerSpec.BPE
    model.trainer_spec.vocab_size = len(tokens)
    model.trainer_spec.byte_fallback = True
    model.trainer_spec.unk_id, model.trainer_spec.bos_id, model.trainer_spec.eos_id = 0, 1, 2
    model.trainer_spec.pad_id = -1
    model.normalizer_spec.name = "identity"
    model.normalizer_spec.add_dummy_prefix = True
    model.normalizer_spec.remove_extra_whitespaces = False
    model.normalizer_spec.escape_whitespaces = True
    # The SentencePiece model is the base vocabulary: <unk> <s> </s>, the byte pieces and the
    # ordinary pieces up to the first added token (Phi-3's <|endoftext|> at 32000 onward live in
    # tokenizer.json / tokenizer_config.json, as in the released files). Types in SentencePiece's
    # numbering (1 normal, 2 unknown, 3 control, 6 byte); exactly one unknown piece.
    base = next((i for i in range(3, len(tokens)) if int(types[i]) not in (1, 6)), len(tokens))
    for i, (piece, score) in enumerate(zip(tokens[:base], scores[:base])):
        entry = model.pieces.add()
        kind = 2 if i == 0 else 3 if i < 3 else 6 if int(types[i]) == 6 else 1
        entry.piece, entry.score, entry.type = piece, float(score), kind
    model.trainer_spec.vocab_size = base
    (Path(out) / "tokenizer.model").write_bytes(model.SerializeToString())
    return True


def prepend_per_segment(data: dict) -> bool:
    """Make a SentencePiece tokenizer.json put "▁" before every piece of text between special tokens.

    transformers' non-legacy Llama tokenizer (what its GGUF reader builds for a SentencePiece
    vocabulary) pre-tokenizes with Metaspace prepend_scheme "first": "▁" before the first piece only,
    none after a special token. SentencePiece and llama.cpp prepend it to every piece (Llama 2 /
    Mistral v0.1 / Phi-3 ship that as a Prepend normalizer, as here), so `<s>[INST] hi` and a chat
    template's text after each special token would read differently. A Prepend normalizer also
    prepends to text that already starts with a space ("  hi" -> "▁▁▁hi"), as llama.cpp does, where
    Metaspace would not.

    Args:
        data: the parsed tokenizer.json, changed in place.

    Returns:
        True when it changed `data` (Metaspace with prepend_scheme "first"), False otherwise.
    """
    pre = data.get("pre_tokenizer") or {}
    if pre.get("type") != "Metaspace" or pre.get("prepend_scheme") != "first":
        return False
    data["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": SPIECE_UNDERLINE},
        {"type": "Replace", "pattern": {"String": " "}, "content": SPIECE_UNDERLINE}]}
    data["pre_tokenizer"] = None
    return True
