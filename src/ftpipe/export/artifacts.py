"""Shared checks of the export stages: what a model folder holds, and publishing folders atomically.

Used by `export-merged` (ftpipe/export/export_merged.py), `convert-awq`, `export-gguf`
(ftpipe/export/export_gguf.py) and `ollama-load` (ftpipe/export/ollama_load.py); sample
conversations and the base-model record are hand-offs (`ftpipe.handoff`). Imports nothing heavy
at module level.

    ftpipe export-merged --config debug_config.yaml --run my-run
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from ftpipe.core.errors import InputError
from ftpipe.core.fsutil import read_json
from ftpipe.core.runs import Project

log = logging.getLogger(__name__)

CHAT_TEMPLATE_FILE = "chat_template.jinja"
ADAPTER_MARKERS = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")




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
