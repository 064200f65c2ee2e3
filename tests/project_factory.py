"""One way to build a test project: `make_project` writes config.yaml (the model, the demo data
sets, whatever settings a test adds), copies the demo data in and, when asked, prepares it with the
real preprocess stages run in this process, so prepared/<name>/ and logs/_prepared/<name>/manifest.json
are what `ftpipe preprocess-sft` / `preprocess-dpo` write, never hand-made look-alikes.

Every folder's builder goes through it (tests/conftest.py `project`, tests/eval, tests/export,
tests/training, tests/serve: thin wrappers that add their settings). Import it as
`tests.project_factory` only (`from tests.project_factory import make_project`), never as
`project_factory` through tests/ on sys.path: that would be a second copy of the module.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo"

# The demo sets, where make_project copies them and the config sections that name them.
SENTIMENT = {"name": "sentiment", "source": "data/sentiment.jsonl"}
PREFERENCE = {"name": "preference", "source": "data/preference.jsonl", "val_source": "data/preference_val.jsonl"}


def make_project(root: Path, model_dir: Path, config: str | Mapping[str, Any] = "", *, model_in: str | None = None,
                 data: bool = True, preference: bool = False, prepared: bool = False, venvs: Iterable[str] = (),
                 files: Mapping[str, str] | None = None) -> Path:
    """A project folder at `root` (created if missing).

    Args:
        root: the project folder.
        model_dir: the model. `model.path` names it where it is (relative when it lies inside `root`,
            else absolute), unless `model_in` copies it into the project.
        config: settings over the defaults (`model`, `data`, `preference`), as YAML text or a dict,
            merged key by key (a mapping merges into the default's mapping; anything else replaces it).
        model_in: copy the model to `root / model_in` (e.g. "models/tiny") and name it there, so the
            paths recorded from it (an adapter's base model) are project-relative.
        data: copy the demo sentiment set to data/sentiment.jsonl; `data:` names it (prepared/sentiment/).
        preference: copy the demo preference pairs to data/preference.jsonl and preference_val.jsonl;
            `preference:` names them (prepared/preference/).
        prepared: prepare the data sets with their real stages in this process: preprocess-sft
            (`data`), then preprocess-dpo (with `preference`).
        venvs: stage environments to link in from the checkout (".venv", ".venv-gguf", ...): the
            executor looks for them in the project root first.
        files: more files, path relative to `root` -> text (a prompt-checks file, ...).

    Returns:
        `root`.
    """
    root.mkdir(parents=True, exist_ok=True)
    for venv in venvs:
        (root / venv).symlink_to(REPO / venv, target_is_directory=True)
    if model_in is not None:
        shutil.copytree(model_dir, root / model_in)
        model_dir = root / model_in
    settings: dict[str, Any] = {"model": {"path": _named(model_dir, root)}}
    if data:
        (root / "data").mkdir(exist_ok=True)
        shutil.copy(DEMO / "sentiment.jsonl", root / SENTIMENT["source"])
        settings["data"] = dict(SENTIMENT)
    if preference:
        (root / "data").mkdir(exist_ok=True)
        shutil.copy(DEMO / "preference.jsonl", root / PREFERENCE["source"])
        shutil.copy(DEMO / "preference_val.jsonl", root / PREFERENCE["val_source"])
        settings["preference"] = dict(PREFERENCE)
    _write(root, merge(settings, config))
    for name, text in (files or {}).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    if prepared:
        prepare(root, *(["preprocess-sft"] if data else []), *(["preprocess-dpo"] if preference else []))
    return root


def update_config(root: Path, config: str | Mapping[str, Any]) -> Path:
    """Merge `config` (YAML text or a dict, as in `make_project`) into root/config.yaml; returns its path."""
    path = root / "config.yaml"
    return _write(root, merge(yaml.safe_load(path.read_text(encoding="utf-8")) or {}, config))


def prepare(root: Path, *stages: str) -> None:
    """Run preprocess stages (preprocess-sft, preprocess-dpo) on the project in this process, as
    `ftpipe <stage>` does: their outputs under prepared/, their manifests under logs/_prepared/."""
    from ftpipe.config import load_config
    from ftpipe.stages import run_stage

    for stage in stages:
        # environ={}: an FTPIPE_* variable of the test run must not change what is prepared.
        run_stage(stage, load_config(root / "config.yaml", environ={}))


def _named(model_dir: Path, root: Path) -> str:
    """`model.path` for `model_dir`: relative to the project when inside it."""
    try:
        return model_dir.relative_to(root).as_posix()
    except ValueError:
        return str(model_dir)


def merge(*layers: str | Mapping[str, Any]) -> dict[str, Any]:
    """Settings layers (YAML text or dicts) merged in order, key by key: a mapping merges into the
    mapping before it, anything else replaces what was there."""
    out: dict[str, Any] = {}
    for layer in layers:
        out = _merged(out, dict(yaml.safe_load(layer) or {}) if isinstance(layer, str) else layer)
    return out


def _merged(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


def _write(root: Path, settings: Mapping[str, Any]) -> Path:
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(dict(settings), sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path
