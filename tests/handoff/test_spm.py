"""SentencePiece models rebuilt from a Gemma-layout GGUF vocabulary (ftpipe/handoff/spm.py), and the
added tokens import-gguf lists beside them (ftpipe/ingest/import_gguf.py `list_added_tokens`).

llama.cpp's Gemma 3 converter reads tokenizer.model (without one it takes the byte-level BPE path and
writes another vocabulary), and types a user-defined token USER_DEFINED only when tokenizer_config.json
lists it as added; its GGUF spells the "▁" of such a token as a space.
"""

from __future__ import annotations

import json
from pathlib import Path

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6
PIECES = [("<pad>", CONTROL), ("<eos>", CONTROL), ("<bos>", CONTROL), ("<unk>", CONTROL), ("<mask>", CONTROL),
          ("<start_of_turn>", CONTROL), ("\n\n", USER_DEFINED), ("  ", USER_DEFINED),
          *((f"<0x{b:02X}>", BYTE) for b in range(256)), ("\u2581", NORMAL), ("a", NORMAL), ("b", NORMAL),
          ("\u2581a", NORMAL), ("ab", NORMAL)]


def gemma_vocab_gguf(path: Path) -> Path:
    """A vocab-only GGUF laid out as a converted Gemma 3: <pad> <eos> <bos> <unk> first, <unk> CONTROL."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "gemma3")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([p for p, _ in PIECES])
    writer.add_token_scores([-1000.0 if t in (CONTROL, USER_DEFINED) else -float(i) for i, (_, t) in enumerate(PIECES)])
    writer.add_token_types([t for _, t in PIECES])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gemma_layout_gets_a_sentencepiece_model(tmp_path: Path) -> None:
    """Every piece with its type (<unk> the one unknown piece), Gemma's special ids, no dummy prefix."""
    from transformers.utils import sentencepiece_model_pb2_new as pb

    from ftpipe.handoff import spm

    gguf = gemma_vocab_gguf(tmp_path / "vocab.gguf")
    assert spm.write_sentencepiece_model(gguf, tmp_path) is True
    model = pb.ModelProto()
    model.ParseFromString((tmp_path / "tokenizer.model").read_bytes())
    spec = model.trainer_spec
    assert (spec.pad_id, spec.eos_id, spec.bos_id, spec.unk_id, spec.byte_fallback) == (0, 1, 2, 3, True)
    assert model.normalizer_spec.add_dummy_prefix is False
    want = [("\u2581\u2581" if p == "  " else p, UNKNOWN if i == 3 else t) for i, (p, t) in enumerate(PIECES)]
    assert [(piece.piece, piece.type) for piece in model.pieces] == want  # the GGUF's "  " as SentencePiece spells it


def test_gemma_layout_lists_control_and_user_defined_tokens(tmp_path: Path) -> None:
    from ftpipe.handoff import spm

    added = spm.added_tokens(spm.read_vocabulary(gemma_vocab_gguf(tmp_path / "vocab.gguf")))
    assert [(t["id"], t["content"], t["special"]) for t in added] == [
        (0, "<pad>", True), (1, "<eos>", True), (2, "<bos>", True), (3, "<unk>", True), (4, "<mask>", True),
        (5, "<start_of_turn>", True), (6, "\n\n", False), (7, "\u2581\u2581", False)]
    assert spm.added_tokens(None) == []


def test_import_lists_the_added_tokens_the_gguf_reader_left_out(tmp_path: Path) -> None:
    """tokenizer.json gains the missing ones; tokenizer_config.json's added_tokens_decoder lists all."""
    from ftpipe.handoff import spm
    from ftpipe.ingest.import_gguf import list_added_tokens

    added = spm.added_tokens(spm.read_vocabulary(gemma_vocab_gguf(tmp_path / "vocab.gguf")))
    folder = tmp_path / "model"
    folder.mkdir()
    present = [dict(t) for t in added if t["id"] != 7]
    (folder / "tokenizer.json").write_text(json.dumps({"added_tokens": present}), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>"}), encoding="utf-8")
    list_added_tokens(folder, added)
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    assert [t["id"] for t in data["added_tokens"]] == list(range(8))
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["bos_token"] == "<bos>"
    assert config["added_tokens_decoder"]["7"] == {"content": "\u2581\u2581", "single_word": False, "lstrip": False,
                                                   "rstrip": False, "normalized": False, "special": False}
    assert config["added_tokens_decoder"]["4"]["special"] is True
