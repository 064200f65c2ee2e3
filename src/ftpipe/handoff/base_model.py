"""The base-model record: which model an adapter was trained on (`ftpipe_base_model.json`).

`finetune-sft` writes it into outputs/<run>/adapter/ (the `ModelRef` record: id, revision, path
relative to the project root); `export-merged` copies it into merged/ (and convert-awq into awq/).
export-merged, eval-sft and serve (adapter on its base) read it back with `read_base_model`.

    ftpipe finetune-sft --config debug_config.yaml
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ftpipe.core.errors import InputError
from ftpipe.core.fsutil import atomic_write_json, read_json
from ftpipe.core.model_ref import ModelRef, resolve_model
from ftpipe.core.runs import RunDir

log = logging.getLogger(__name__)

BASE_MODEL_FILE = "ftpipe_base_model.json"


def write_base_model(folder: Path, record: dict[str, Any]) -> None:
    """Write `record` (`ModelRef.record(root)`: {"id", "revision", "path"}) into `folder`, atomically."""
    atomic_write_json(Path(folder) / BASE_MODEL_FILE, record)


def read_base_model(run: RunDir) -> ModelRef:
    """The base model of the run's adapter, resolved like the `model` config section.

    A local `path` (relative to the project root) wins when it holds a config.json; otherwise the
    hub `id` is used (from the cache when offline).

    Args:
        run: the run; the record is outputs/<run>/adapter/ftpipe_base_model.json.

    Raises:
        InputError: the file is missing or invalid, or the model it names cannot be found
            (naming the file).
    """
    project = run.project
    ref_file = run.adapter / BASE_MODEL_FILE
    data = read_json(ref_file)
    if not isinstance(data, dict) or not (data.get("path") or data.get("id")):
        raise InputError(
            f"{project.rel(ref_file)}: missing or invalid (expected {{\"id\", \"revision\", \"path\"}}): "
            "cannot tell which base model the adapter belongs to",
            hint=f"ftpipe finetune-sft --run {run.name} --force",
        )
    path = data.get("path")
    if path and data.get("id") and not (project.resolve(path) / "config.json").is_file():
        log.info("base model folder %s not found: using hub id %s", path, data["id"])
        path = None
    ref = SimpleNamespace(id=data.get("id"), revision=data.get("revision"), path=path, tiny=None)
    try:
        return resolve_model(ref, project.root)
    except InputError as exc:
        raise InputError(f"{project.rel(ref_file)}: base model: {exc.message}", hint=exc.hint) from None


TINY_SPEC_FILE = "ftpipe_tiny_model.json"  # the model.tiny section a tiny base model was built from


def built_from(folder: Path) -> dict | None:
    """The `model.tiny` settings the tiny model in `folder` was built from (None: none recorded).

    `make-tiny-model` writes it; `ftpipe run` compares it with `model.tiny` to rebuild on a change.
    """
    return read_json(Path(folder) / TINY_SPEC_FILE)
