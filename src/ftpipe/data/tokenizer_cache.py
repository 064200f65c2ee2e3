"""The model's tokenizer as `preprocess-sft` uses it, remembered between runs.

Part of `preprocess-sft` (ftpipe/data/render.py loads through it). Loading a tokenizer with
AutoTokenizer imports transformers' model classes and, with them, torch: 3-5 s of every run, a
tenth of a million-row preprocess on two cores. So the first run loads it with AutoTokenizer as
before, then writes what rendering and counting need to `.cache/ftpipe/tokenizers/<key>.json` in the
project: the `tokenizers` backend exactly as transformers built it (`Tokenizer.to_str()`:
normalizer, pre-tokenizer, model, added tokens, truncation), the chat template(s), the special
tokens a template sees, the class name and size. Later runs build the backend from that entry with
`tokenizers` alone and render through transformers' own `render_jinja_template` (what
`apply_chat_template` calls), so texts and token counts are the same (tests/data/test_tokenizer_cache.py).

The key hashes every file of the model folder except weights, and the transformers and tokenizers
versions: a changed tokenizer file or library misses the cache. Only local folders are cached, and
never with `model.trust_remote_code` (remote code may do anything at load time). An unreadable
entry is ignored and rewritten.

    ftpipe preprocess-sft --config debug_config.yaml
"""

from __future__ import annotations

import hashlib
import json
import logging
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from ftpipe.core.fsutil import atomic_write_json

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the entry's layout changes
MAX_FILE = 64 * 2**20  # tokenizer files are a few MiB; anything bigger is a weight, not hashed
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".npz")
TEMPLATE_DIRS = ("additional_chat_templates",)


def entry_path(ref, model_cfg, root: Path) -> Path | None:
    """Where the cache entry of this model's tokenizer lives, or None when it must not be cached."""
    if not ref.path or model_cfg.trust_remote_code:
        return None
    folder = Path(ref.path)
    digest = hashlib.sha256(f"ftpipe-tokenizer {FORMAT}".encode())
    try:
        for lib in ("transformers", "tokenizers"):
            digest.update(f" {lib} {version(lib)}".encode())
        for path in _files(folder):
            digest.update(b"\0" + path.relative_to(folder).as_posix().encode() + b"\0")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    except (OSError, PackageNotFoundError):
        return None
    return root / ".cache" / "ftpipe" / "tokenizers" / f"{digest.hexdigest()[:32]}.json"


def _files(folder: Path) -> list[Path]:
    found = [p for p in folder.iterdir() if p.is_file()]
    for name in TEMPLATE_DIRS:
        if (folder / name).is_dir():
            found += [p for p in (folder / name).rglob("*") if p.is_file()]
    return sorted(p for p in found if not p.name.endswith(WEIGHT_SUFFIXES) and p.stat().st_size <= MAX_FILE)


def save(path: Path, tokenizer) -> None:
    """Write the entry for a tokenizer loaded by AutoTokenizer (a failure only costs the next run time)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        return  # not a fast tokenizer: nothing to rebuild from
    entry = {
        "format": FORMAT,
        "class": type(tokenizer).__name__,
        "size": len(tokenizer),
        "backend": backend.to_str(),
        "encode_special_tokens": bool(getattr(backend, "encode_special_tokens", False)),
        "chat_template": tokenizer.chat_template,
        "templates": {"default": _template(tokenizer, None), "tool_use": _template(tokenizer, [{}])},
        "special_tokens_map": dict(tokenizer.special_tokens_map),
    }
    try:
        atomic_write_json(path, entry)
    except (OSError, TypeError, ValueError) as exc:
        log.info("tokenizer not cached (%s: %s)", type(exc).__name__, exc)


def _template(tokenizer, tools) -> str | None:
    try:
        return tokenizer.get_chat_template(None, tools)
    except ValueError:  # e.g. several named templates and no default: apply_chat_template raises too
        return None


def load(path: Path) -> CachedTokenizer | None:
    """The cached tokenizer, or None when there is no usable entry."""
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        if entry.get("format") != FORMAT:
            return None
        return CachedTokenizer(entry)
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 - a damaged entry is only a cache miss
        log.info("ignoring the tokenizer cache entry %s (%s: %s)", path.name, type(exc).__name__, exc)
        return None


class CachedTokenizer:
    """What the renderer needs of a transformers tokenizer: `apply_chat_template(tokenize=False)`, the
    backend, the chat template, the size; rebuilt from a cache entry without importing torch."""

    def __init__(self, entry: dict[str, Any]) -> None:
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_str(entry["backend"])
        self._tokenizer.encode_special_tokens = entry["encode_special_tokens"]
        self.chat_template = entry["chat_template"]
        self.templates: dict[str, str | None] = entry["templates"]
        self.special_tokens_map: dict[str, str] = entry["special_tokens_map"]
        self.class_name: str = entry["class"]
        self.size: int = entry["size"]

    def __len__(self) -> int:
        return self.size

    def apply_chat_template(self, conversation: list[dict], tools: list | None = None, tokenize: bool = False) -> str:
        """The rendered text, as transformers' `apply_chat_template(conversation, tools=tools, tokenize=False)`."""
        from transformers.utils.chat_template_utils import render_jinja_template

        if tokenize:
            raise ValueError("CachedTokenizer renders only (tokenize=False); count with its backend")
        template = self.templates["tool_use" if tools is not None else "default"]
        if template is None:
            raise ValueError("this model has several chat templates and none is named 'default'")
        if not conversation:
            raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
        messages = [{k: v for k, v in m.items() if v is not None} for m in conversation]  # as transformers does
        rendered, _ = render_jinja_template(
            conversations=[messages], tools=tools, chat_template=template, **self.special_tokens_map
        )
        return rendered[0]

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict[str, list[list[int]]]:
        """Token ids of `texts` (the `tokenizer(texts)["input_ids"]` form)."""
        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
        return {"input_ids": [e.ids for e in encodings]}
