"""Held-out plain text for eval-sft's `text_perplexity`: the documents of `eval.perplexity_file` and
the token windows every artifact is scored on.

The file is UTF-8 text; documents are separated by one or more blank lines (lines holding only
whitespace count as blank); each document is stripped. A document is tokenized as plain text, no
chat template, with the tokenizer's own special tokens (BOS where the tokenizer adds one), then cut
into consecutive windows of at most `eval.max_length` tokens; no context crosses a window, and
the first token of each window is context only. Every artifact scores the same token ids (the GGUF
worker gives llama.cpp these ids, not its own tokenization), so the perplexities compare.

Imports only the standard library, ftpipe.core.errors and ftpipe.handoff.checks (standard library
only): eval-sft's pre-flight and every environment's worker read the file with it.

    ftpipe eval-sft --run my-run --set eval.perplexity_file=data/heldout.txt
"""

from __future__ import annotations

import re
from pathlib import Path

KEY = "eval.perplexity_file"


def read_documents(path: Path, shown: str | None = None) -> list[str]:
    """The documents of a held-out text file (blank-line separated, stripped, empty ones dropped).

    Raises:
        InputError: missing or unreadable file, not UTF-8, or no document in it.
    """
    from ftpipe.core.errors import InputError
    from ftpipe.handoff.checks import read_named_file

    shown = shown or str(path)
    text, hint = read_named_file(path, KEY, shown)
    documents = [d.strip() for d in re.split(r"\n[ \t\r\f\v]*\n", text.replace("\r\n", "\n")) if d.strip()]
    if not documents:
        raise InputError(f"{KEY} {shown}: no text in it", hint=hint)
    return documents


def text_windows(tokenizer, documents: list[str], max_length: int) -> list[list[int]]:
    """Token ids of each document (plain text, the tokenizer's special tokens), cut into
    consecutive windows of at most `max_length` tokens; windows of one token (nothing to predict)
    are dropped."""
    windows = []
    for doc in documents:
        ids = list(tokenizer(doc, add_special_tokens=True)["input_ids"])
        windows.extend(w for w in (ids[i:i + max_length] for i in range(0, len(ids), max_length)) if len(w) > 1)
    return windows
