"""llama.cpp's reading of a GGUF, for import-gguf to compare its imported model with (gguf environment).

import-gguf runs in the train environment; llama-cpp-python lives in the gguf one, so the stage
writes a spec and runs

    .venv-gguf/bin/python -m ftpipe.ingest.llama_reference --spec SPEC.json --out REF.npz

For each probe text: llama.cpp's token ids (`tokenize(text, add_bos=False, special=True)`, as
transformers' `add_special_tokens=False`) and its logits at every position (`logits_all=True`),
plus the vocabulary's end-of-generation ids. Logs to stderr and, when FTPIPE_WORKER_LOG names the
stage's run.log, there too. Exit 0 when the result was written, 2 with one line on a bad spec or an
unreadable GGUF.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import ClassVar

from pydantic import Field

from ftpipe.core.configbase import HandOffFile
from ftpipe.core.errors import FtpipeError, InputError
from ftpipe.core.logs import worker_start

log = logging.getLogger(__name__)


class ReferenceSpec(HandOffFile):
    """What import-gguf asks llama.cpp for."""

    what: ClassVar[str] = "llama.cpp reference spec"
    writer: ClassVar[str] = "ftpipe import-gguf"

    gguf: str = Field(description="The source GGUF file.")
    texts: list[str] = Field(description="The probe texts, tokenized with special tokens recognised.")
    n_threads: int = Field(2, ge=1, description="llama.cpp threads.")


def reference(spec: ReferenceSpec) -> dict:
    """Token ids and logits of every probe text (arrays named ids<i> / logits<i>), and `eog_ids`."""
    import numpy as np
    from llama_cpp import Llama, llama_vocab_is_eog

    started = time.monotonic()
    tokenized = []
    try:
        vocab_only = Llama(model_path=spec.gguf, vocab_only=True, verbose=False)
    except ValueError as exc:  # llama-cpp-python: "Failed to load model from file"
        raise InputError(f"llama.cpp cannot read {Path(spec.gguf).name}: {exc}") from None
    tokenized = [vocab_only.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in spec.texts]
    n_vocab = vocab_only.n_vocab()
    vocab = vocab_only._model.vocab
    eog = [i for i in range(n_vocab) if llama_vocab_is_eog(vocab, i)]
    vocab_only.close()
    longest = max((len(ids) for ids in tokenized), default=1)
    llm = Llama(model_path=spec.gguf, n_ctx=max(64, longest), n_batch=max(64, longest), n_threads=spec.n_threads,
                logits_all=True, verbose=False, seed=0)
    arrays: dict = {"eog_ids": np.asarray(eog, dtype=np.int64)}
    for i, ids in enumerate(tokenized):
        arrays[f"ids{i}"] = np.asarray(ids, dtype=np.int64)
        if ids:
            llm.reset()
            llm.eval(ids)
            arrays[f"logits{i}"] = np.array(llm.scores[: len(ids)], dtype=np.float32)  # a copy: scores is reused
    llm.close()
    log.info("llama.cpp: %d texts, %d positions in %.1f s", len(tokenized), sum(map(len, tokenized)),
             time.monotonic() - started)
    return arrays


def main(argv: list[str] | None = None) -> int:
    args = worker_start(argv, "ftpipe.ingest.llama_reference", __doc__, "import-gguf", ".npz result", "[llama.cpp reference] ")
    try:
        arrays = reference(ReferenceSpec.read(args.spec))
    except FtpipeError as exc:
        log.error("%s", exc.one_line())
        return exc.exit_code
    import numpy as np

    partial = args.out.with_name(args.out.name + ".partial.npz")
    np.savez(partial, **arrays)
    partial.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
