"""Token counting with the model's chat template, fast enough for millions of rows.

Part of `preprocess-sft`. The tokenizer comes from the `model` config section
(`ftpipe.core.model_ref.resolve_model`). Rendering every row through Jinja dominates the cost, so
by default each conversation *shape* (its sequence of roles) is rendered once with sentinel
contents and split into a skeleton; a row of that shape is then the skeleton's pieces joined with
its contents. A shape uses the skeleton only when the Jinja rendering of its first rows matches it
exactly, and every `VERIFY_EVERY`-th row is checked again; rows with tool calls or tool
definitions, rows whose content holds one of the template's own markers (`<|im_end|>`,
`</think>`...), and templates that alter contents (e.g. `strip()`) always go through Jinja.
`preprocess.fast_render: false` renders every row with Jinja. Token ids come from the fast
tokenizer's batch encoder (Rust), without special tokens (the template already holds them).

    ftpipe preprocess-sft --config debug_config.yaml
"""

from __future__ import annotations

import hashlib
import logging
import re
from typing import Any

from ftpipe.core.errors import InputError

log = logging.getLogger(__name__)

VERIFY_FIRST = 2  # rows of each shape compared with Jinja before the skeleton is trusted
VERIFY_EVERY = 997  # then every n-th fast-rendered row is compared again
_SENTINEL = "\n\x1f@ftpipe{}@\x1f \n"
_LITERAL = re.compile(r"'((?:[^'\\]|\\.)*)'|\"((?:[^\"\\]|\\.)*)\"")
_MARKUP = re.compile(r"[<\[|{}]")


def load_tokenizer(model_cfg, root):
    """The model's tokenizer (AutoTokenizer, `trust_remote_code` from the config) and its ModelRef.

    Raises:
        InputError: the model cannot be resolved, the tokenizer cannot load, or it has no chat template.
    """
    from transformers import AutoTokenizer

    from ftpipe.core.model_ref import resolve_model

    ref = resolve_model(model_cfg, root)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            ref.load_from, trust_remote_code=model_cfg.trust_remote_code, **ref.pretrained_kwargs()
        )
    except (OSError, ValueError) as exc:
        raise InputError(
            f"model {ref.load_from}: cannot load its tokenizer ({type(exc).__name__}: {str(exc).splitlines()[0]})",
            hint="check model.path / model.id",
        ) from None
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(
            f"model {ref.load_from}: the tokenizer has no chat template, so conversations cannot be rendered",
            hint="use an instruct/chat model, or add chat_template.jinja to the model folder",
        )
    return tokenizer, ref


def tokenizer_record(tokenizer, ref, root) -> dict[str, Any]:
    """What metadata.json says about the tokenizer."""
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else str(tokenizer.chat_template)
    return {
        "model": ref.record(root),
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "chat_template_sha256": hashlib.sha256(template.encode("utf-8")).hexdigest(),
    }


class Renderer:
    """Renders conversations with the chat template and counts their tokens in batches."""

    def __init__(self, tokenizer, fast: bool = True) -> None:
        self.tokenizer = tokenizer
        self.fast = fast
        self.backend = getattr(tokenizer, "_tokenizer", None)
        template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
        literals = {a or b for a, b in _LITERAL.findall(template)}
        self.markers = sorted(m for m in literals if len(m) >= 3 and _MARKUP.search(m) and "\\" not in m)
        self.skeletons: dict[tuple, list[str] | None] = {}
        self.checked: dict[tuple, int] = {}
        self.stats = {"fast": 0, "jinja": 0, "mismatches": 0}

    def render(self, row: dict) -> str:
        """The full Jinja rendering of one row (messages + tools)."""
        return self.tokenizer.apply_chat_template(row["messages"], tools=row.get("tools"), tokenize=False)

    def _shape(self, row: dict) -> tuple | None:
        if not self.fast or "tools" in row:
            return None
        roles = []
        for m in row["messages"]:
            if len(m) != 2:  # tool_calls, name, tool_call_id: let Jinja handle them
                return None
            content = m["content"]
            if any(marker in content for marker in self.markers) or "\x1f@ftpipe" in content:
                return None
            roles.append(m["role"])
        return tuple(roles)

    def _skeleton(self, shape: tuple) -> list[str] | None:
        if shape not in self.skeletons:
            sentinels = [_SENTINEL.format(i) for i in range(len(shape))]
            messages = [{"role": r, "content": s} for r, s in zip(shape, sentinels)]
            try:
                text = self.tokenizer.apply_chat_template(messages, tokenize=False)
            except Exception:  # noqa: BLE001 - the template rejects this shape: rows will say why
                self.skeletons[shape] = None
                return None
            pieces, rest = [], text
            for s in sentinels:
                if rest.count(s) != 1:  # content altered, dropped or repeated: no skeleton
                    self.skeletons[shape] = None
                    return None
                head, rest = rest.split(s)
                pieces.append(head)
            pieces.append(rest)
            self.skeletons[shape] = pieces
        return self.skeletons[shape]

    def texts(self, rows: list[dict]) -> list[str | Exception]:
        """Rendered text of each row (or the exception the template raised for it)."""
        out: list[str | Exception] = []
        for row in rows:
            shape = self._shape(row)
            pieces = self._skeleton(shape) if shape is not None else None
            if pieces is not None:
                n = self.checked.get(shape, 0)
                self.checked[shape] = n + 1
                parts = [pieces[0]]
                for m, piece in zip(row["messages"], pieces[1:]):
                    parts += [m["content"], piece]
                text = "".join(parts)
                if n < VERIFY_FIRST or n % VERIFY_EVERY == 0:
                    slow = self._jinja(row)
                    if slow != text:
                        self.stats["mismatches"] += 1
                        self.skeletons[shape] = None  # this shape renders content-dependently
                        log.info("chat template renders shape %s content-dependently: using Jinja for it", "/".join(shape))
                        out.append(slow)
                        continue
                self.stats["fast"] += 1
                out.append(text)
            else:
                out.append(self._jinja(row))
        return out

    def _jinja(self, row: dict) -> str | Exception:
        self.stats["jinja"] += 1
        try:
            return self.render(row)
        except Exception as exc:  # noqa: BLE001 - reported as this row's error
            return exc

    def count(self, texts: list[str]) -> list[int]:
        """Token counts of rendered texts (batched, no special tokens added)."""
        if not texts:
            return []
        if self.backend is not None and hasattr(self.backend, "encode_batch_fast"):
            return [len(e.ids) for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
