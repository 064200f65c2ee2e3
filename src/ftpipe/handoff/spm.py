"""SentencePiece vocabularies in the form llama.cpp's converter reads, rebuilt from a GGUF.

A GGUF whose `tokenizer.ggml.model` is "llama" holds a SentencePiece vocabulary (Llama 2, Mistral
v0.1, Phi-3, Gemma 2 / 3): pieces, scores and token types. transformers' GGUF reader turns it into a
tokenizer.json only; llama.cpp's converter reads such a vocabulary from `tokenizer.model` (Phi-3's
and Gemma 3's converters require it: without it Gemma 3's takes the byte-level BPE path), and reads
text the way SentencePiece does: "▁" before every piece of text between special tokens (Gemma: no
"▁" is added). Two stages rebuild tokenizers from GGUF vocabularies and use this module:
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
# The first pieces of the Gemma 2 / 3 layout: padding, EOS, BOS, unknown.
GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>")
# llama.cpp's token types (gguf.TokenType), the same numbers as SentencePiece's piece types.
CONTROL, USER_DEFINED = 3, 4


Vocabulary = tuple[list[str], list[float], list[int]]  # pieces, scores, token types


def write_sentencepiece_model(gguf: Path, out: Path, vocabulary: Vocabulary | None = None) -> bool:
    """Write `out/tokenizer.model` for a SentencePiece vocabulary, built from the GGUF's pieces,
    scores and types (the file the released models ship and llama.cpp's converter reads).

    Args:
        gguf: the GGUF file.
        out: the model folder.
        vocabulary: `read_vocabulary(gguf)` when the caller has it (a 256k vocabulary takes seconds to read).

    Returns:
        False for any other vocabulary (byte-level BPE...): there is no such file to write; also
        False for a SentencePiece vocabulary laid out neither as Llama 2's (<unk> <s> </s> first)
        nor as Gemma's (<pad> <eos> <bos> <unk> first).
    """
    vocabulary = vocabulary or read_vocabulary(gguf)
    if vocabulary is None:
        return False
    tokens, scores, types = vocabulary
    if list(tokens[:4]) == list(GEMMA_SPECIALS):
        model = _gemma_model(tokens, scores, types)
    elif list(tokens[:3]) == list(LLAMA_SPECIALS):
        model = _llama_model(tokens, scores, types)
    else:
        return False
    (Path(out) / "tokenizer.model").write_bytes(model.SerializeToString())
    return True


def read_vocabulary(gguf: Path) -> Vocabulary | None:
    """(pieces, scores, token types) of a GGUF's SentencePiece vocabulary; None for another kind."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf))
    field = reader.fields.get("tokenizer.ggml.model")
    if field is None or field.contents() != "llama":
        return None
    return (list(reader.fields["tokenizer.ggml.tokens"].contents()),
            [float(s) for s in reader.fields["tokenizer.ggml.scores"].contents()],
            [int(t) for t in reader.fields["tokenizer.ggml.token_type"].contents()])


def sentencepiece_spelling(token: str, kind: int) -> str:
    """A token as SentencePiece spells it: llama.cpp's converter writes the "▁" of a user-defined
    token as a space (Gemma's runs of spaces), the model and tokenizer.json keep "▁"."""
    return token.replace(" ", SPIECE_UNDERLINE) if kind == USER_DEFINED else token


def _gemma_model(tokens: list[str], scores: list[float], types: list[int]):
    """Gemma 2 / 3's layout: every piece (user-defined and control ones included, as Gemma's own
    tokenizer.model holds them), no dummy prefix, byte fallback; <unk> the one unknown piece."""
    from transformers.utils import sentencepiece_model_pb2_new as pb

    model = pb.ModelProto()
    model.trainer_spec.model_type = pb.TrainerSpec.BPE
    model.trainer_spec.vocab_size = len(tokens)
    model.trainer_spec.byte_fallback = True
    model.trainer_spec.pad_id, model.trainer_spec.eos_id, model.trainer_spec.bos_id, model.trainer_spec.unk_id = 0, 1, 2, 3
    model.normalizer_spec.name = "identity"
    model.normalizer_spec.add_dummy_prefix = False
    model.normalizer_spec.remove_extra_whitespaces = False
    model.normalizer_spec.escape_whitespaces = True
    for i, (piece, score, kind) in enumerate(zip(tokens, scores, types)):
        entry = model.pieces.add()
        # <unk> is CONTROL in a converted Gemma GGUF (tokenizer_config.json marks it special); a
        # SentencePiece model needs it UNKNOWN. Types 1-6 are the same numbers in both formats.
        entry.piece, entry.score = sentencepiece_spelling(piece, kind), score
        entry.type = 2 if i == 3 else kind if 1 <= kind <= 6 else 1
    return model


def _llama_model(tokens: list[str], scores: list[float], types: list[int]):
    """Llama 2's layout: <unk> <s> </s>, the byte pieces and the ordinary pieces, a dummy prefix."""
    from transformers.utils import sentencepiece_model_pb2_new as pb

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
    return model


def added_tokens(vocabulary: Vocabulary | None) -> list[dict]:
    """The GGUF's control and user-defined tokens of a Gemma-layout vocabulary, as a released Gemma
    tokenizer lists them (tokenizer.json's `added_tokens`; `special` for control tokens), in
    SentencePiece spelling. llama.cpp's converter types a token from this list (CONTROL when special,
    else USER_DEFINED), where the SentencePiece model alone would make user-defined pieces NORMAL.
    Empty for any other vocabulary (`vocabulary`: `read_vocabulary`'s).
    """
    if vocabulary is None or list(vocabulary[0][:4]) != list(GEMMA_SPECIALS):
        return []
    tokens, _, types = vocabulary
    return [{"id": i, "content": sentencepiece_spelling(token, kind), "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": False, "special": kind == CONTROL}
            for i, (token, kind) in enumerate(zip(tokens, types)) if kind in (CONTROL, USER_DEFINED)]


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
