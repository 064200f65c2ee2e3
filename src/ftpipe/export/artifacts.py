"""Shared checks of the export stages: what a model folder holds, sample prompts, base model.

Used by `export-merged` (ftpipe/export/merge.py), `export-gguf` (ftpipe/export/gguf.py) and
`ollama-load` (ftpipe/export/ollama.py). Imports nothing heavy at module level.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ftpipe.core.errors import InputError
from ftpipe.core.fsutil import read_json
from ftpipe.core.model_ref import ModelRef, resolve_model
from ftpipe.core.runs import Project, RunDir

log = logging.getLogger(__name__)

BASE_MODEL_FILE = "ftpipe_base_model.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
ADAPTER_MARKERS = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")

# Conversations used to verify artifacts when the run has no prepared val split.
FALLBACK_CONVERSATIONS: list[list[dict[str, str]]] = [
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ],
    [
        {"role": "user", "content": "Label the review: a wonderful, moving film."},
        {"role": "assistant", "content": "positive"},
    ],
    [
        {"role": "user", "content": "Write one sentence about the sea."},
        {"role": "assistant", "content": "The sea is wide and blue."},
    ],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Name a prime number."},
        {"role": "assistant", "content": "Seven."},
        {"role": "user", "content": "And another one?"},
        {"role": "assistant", "content": "Eleven."},
    ],
]


def weight_files(folder: Path) -> list[Path]:
    """The full-model weight files of a HF folder (single file or every indexed shard).

    Raises:
        InputError: an index names a shard that is missing.
    """
    folder = Path(folder)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            data = read_json(index) or {}
            shards = sorted(set((data.get("weight_map") or {}).values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing or not shards:
                raise InputError(f"{index}: shard(s) missing: {', '.join(missing) or 'empty weight_map'}")
            return [folder / s for s in shards]
    return [p for p in (folder / "model.safetensors", folder / "pytorch_model.bin") if p.is_file()]


def is_adapter_only(folder: Path) -> bool:
    """True when `folder` holds a LoRA adapter (peft files) and no full model weights."""
    folder = Path(folder)
    has_adapter = any((folder / m).is_file() for m in ADAPTER_MARKERS)
    try:
        has_weights = bool(weight_files(folder)) and (folder / "config.json").is_file()
    except InputError:
        has_weights = False
    return has_adapter and not has_weights


def require_full_model(folder: Path, project: Project, hint: str) -> None:
    """Refuse anything but a complete HF model folder (config, weights, tokenizer).

    Raises:
        InputError: adapter-only folder (the GGUF / Ollama trap: it "converts" into a model that
            holds only the LoRA deltas), or missing files, naming what is missing.
    """
    folder = Path(folder)
    where = project.rel(folder)
    if not folder.is_dir():
        raise InputError(f"{where}: no such model folder", hint=hint)
    if is_adapter_only(folder):
        raise InputError(
            f"{where} holds only a LoRA adapter (adapter_config.json, no full weights); "
            "merge it into its base first: converting an adapter alone gives a model without the base weights",
            hint=hint,
        )
    missing = [name for name in ("config.json",) if not (folder / name).is_file()]
    if not weight_files(folder):
        missing.append("model.safetensors (or an index with its shards)")
    if not ((folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()):
        missing.append("tokenizer.json or tokenizer.model")
    if missing:
        raise InputError(f"{where}: not a complete model folder, missing {', '.join(missing)}", hint=hint)


def base_model_ref(adapter_dir: Path, project: Project, run: RunDir) -> ModelRef:
    """The base model named in `<adapter>/ftpipe_base_model.json`, resolved like `model`.

    Raises:
        InputError: file missing/invalid, or the base model cannot be found.
    """
    ref_file = Path(adapter_dir) / BASE_MODEL_FILE
    data = read_json(ref_file)
    if not isinstance(data, dict) or not (data.get("path") or data.get("id")):
        raise InputError(
            f"{project.rel(ref_file)}: missing or invalid (expected {{\"id\", \"revision\", \"path\"}}): "
            "cannot tell which base model the adapter belongs to",
            hint=f"ftpipe finetune-sft --run {run.name} --force",
        )
    cfg = SimpleNamespace(id=data.get("id"), revision=data.get("revision"), path=data.get("path"), tiny=None)
    if cfg.path:
        cfg.path = str(project.resolve(cfg.path))
    return resolve_model(cfg, project.root)


def sample_conversations(project: Project, dataset: str, n: int) -> tuple[list[list[dict[str, Any]]], str]:
    """Up to `n` conversations from the prepared val split (else train), else built-in ones.

    Returns:
        (conversations, source) where source names the file used or "built-in".
    """
    for split in ("val.jsonl", "train.jsonl"):
        path = project.prepared_dir(dataset) / split
        if not path.is_file():
            continue
        rows = []
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if len(rows) >= n:
                    break
                line = line.strip()
                if not line:
                    continue
                messages = json.loads(line).get("messages") or []
                messages = [
                    {"role": m["role"], "content": m.get("content") or ""}
                    for m in messages
                    if m.get("role") in ("system", "user", "assistant")
                ]
                if any(m["role"] == "user" for m in messages):
                    rows.append(messages)
        if rows:
            return rows, project.rel(path)
    return FALLBACK_CONVERSATIONS[:n], "built-in"


def prompt_part(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation up to and including its last user turn (what a generation starts from)."""
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    return messages[: last_user + 1]


def replace_dir(tmp: Path, target: Path) -> None:
    """Move a fully written `tmp` folder to `target`, replacing an older one.

    The old folder is renamed aside first, so at every instant `target` is either the old complete
    folder, absent, or the new complete folder - never half-written.
    """
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    if old.exists():
        shutil.rmtree(old)


def fresh_tmp_dir(target: Path) -> Path:
    """An empty `.<name>.tmp-<pid>` folder next to `target` (stale temp and set-aside `.old-` folders
    of killed earlier attempts removed)."""
    for pattern in (f".{target.name}.tmp-*", f".{target.name}.old-*"):
        for stale in target.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True)
    return tmp
