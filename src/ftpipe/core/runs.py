"""The one owner of paths: project folders, run folders and the `latest.txt` pointers.

    prepared/<dataset>/                 preprocess-sft
    models/<model>/                     import-gguf (logs/_models/<model>/)
    outputs/<run>/adapter/ trainer_state/ merged/ awq/ gguf/ eval/ report.html
    logs/<run>/<stage>/run.log, console.log, manifest.json
    logs/latest.txt, outputs/latest.txt

Paths stored in manifests are relative to the project root, so they mean the same thing on the
host and in every Compose service (the root is mounted at one place). No other module builds these
paths by hand.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftpipe.core.errors import InputError
from ftpipe.core.fsutil import atomic_write_text

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_SLUG = re.compile(r"[^a-z0-9]+")
PREPARED_LOGS = "_prepared"  # logs/_prepared/<dataset>/: cannot clash with a run (names start alnum)
MODEL_LOGS = "_models"  # logs/_models/<model>/: the manifest of the stage that wrote models/<model>/
MODELS = "models"  # models/<model>/: model folders a stage writes into the project (import-gguf)


def validate_name(name: str, what: str = "run name") -> str:
    """Check a run or dataset name: letters, digits, `.`, `_`, `-`; no path parts, no `..`.

    Raises:
        InputError: naming the bad value and the allowed form.
    """
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise InputError(
            f"{what} {name!r} is not allowed: use 1-100 letters, digits, '.', '_' or '-', starting "
            "with a letter or digit (no '/', no '..', not absolute)",
            hint="pick another name, e.g. --run my-run-1",
        )
    return name


def slug(text: str, max_len: int = 24) -> str:
    """Short lowercase label for run names, e.g. `Qwen/Qwen2.5-0.5B` -> `qwen2-5-0-5b`."""
    tail = text.rstrip("/").split("/")[-1].lower()
    return (_SLUG.sub("-", tail).strip("-") or "x")[:max_len].strip("-")


@dataclass(frozen=True)
class Project:
    """The project root and its three top folders."""

    root: Path
    prepared: Path
    outputs: Path
    logs: Path

    @classmethod
    def from_config(cls, loaded) -> "Project":
        """Build from a `LoadedConfig` (paths relative to its root)."""
        root = loaded.root
        paths = loaded.config.paths
        return cls(
            root=root,
            prepared=(root / paths.prepared).resolve(),
            outputs=(root / paths.outputs).resolve(),
            logs=(root / paths.logs).resolve(),
        )

    def resolve(self, path: str | Path) -> Path:
        """A config path (relative to the root, or absolute) as an absolute path."""
        p = Path(path)
        return p if p.is_absolute() else (self.root / p).resolve()

    def rel(self, path: Path) -> str:
        """`path` relative to the project root (POSIX form); absolute only when outside it."""
        path = Path(path).resolve()
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return path.as_posix()

    def prepared_dir(self, dataset: str) -> Path:
        """prepared/<dataset>/ (name validated)."""
        return self.prepared / validate_name(dataset, "dataset name")

    def prepared_log_dir(self, dataset: str) -> Path:
        """logs/_prepared/<dataset>/: logs and manifest of preprocess-sft for that dataset."""
        return self.logs / PREPARED_LOGS / validate_name(dataset, "dataset name")

    def model_dir(self, name: str) -> Path:
        """models/<name>/ (name validated): a model folder written into the project (import-gguf)."""
        return self.root / MODELS / validate_name(name, "model name")

    def model_log_dir(self, name: str) -> Path:
        """logs/_models/<name>/: logs and manifest of the stage that wrote models/<name>/."""
        return self.logs / MODEL_LOGS / validate_name(name, "model name")

    def latest_run_name(self) -> str | None:
        """The run named in outputs/latest.txt, if any."""
        try:
            name = (self.outputs / "latest.txt").read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        return name or None

    def set_latest(self, name: str) -> None:
        """Point outputs/latest.txt and logs/latest.txt at `name` (atomic: never torn)."""
        for folder in (self.outputs, self.logs):
            atomic_write_text(folder / "latest.txt", name + "\n")

    def run_names(self) -> list[str]:
        """Names of all runs (folders under outputs/ or logs/), sorted."""
        names: set[str] = set()
        for folder in (self.outputs, self.logs):
            if folder.is_dir():
                names.update(
                    p.name for p in folder.iterdir() if p.is_dir() and _NAME.match(p.name)
                )
        return sorted(names)


def _under_run(name: str, doc: str | None = None) -> property:
    """A `RunDir` property: outputs/<run>/<name>."""
    return property(lambda self: self.path / name, doc=doc or f"outputs/<run>/{name}")


def gguf_name(outtype: str) -> str:
    """File name of one GGUF type inside outputs/<run>/gguf/ (written by export-gguf, read by
    ollama-load and eval-sft)."""
    return f"model-{outtype}.gguf"


@dataclass(frozen=True)
class RunDir:
    """One run: outputs/<name>/ and logs/<name>/."""

    project: Project
    name: str

    @property
    def path(self) -> Path:
        return self.project.outputs / self.name

    # The run's artifacts, each in its own folder under outputs/<run>/ (named as the artifact).
    adapter = _under_run("adapter")
    trainer_state = _under_run("trainer_state")
    merged = _under_run("merged")
    awq = _under_run("awq")
    gguf = _under_run("gguf")
    ollama = _under_run("ollama", "Where `ollama-load --dry-run` writes the Modelfile it would send.")
    eval = _under_run("eval")
    report = _under_run("report.html")

    @property
    def log_root(self) -> Path:
        return self.project.logs / self.name

    def log_dir(self, stage: str) -> Path:
        """logs/<run>/<stage>/."""
        return self.log_root / stage

    def manifest_path(self, stage: str) -> Path:
        """logs/<run>/<stage>/manifest.json."""
        return self.log_dir(stage) / "manifest.json"

    def stages(self) -> list[str]:
        """Stages with a manifest in this run."""
        if not self.log_root.is_dir():
            return []
        return sorted(p.name for p in self.log_root.iterdir() if (p / "manifest.json").exists())


def new_run(project: Project, name: str | None = None, model: str = "model", data: str = "data") -> RunDir:
    """Create a run folder and point `latest.txt` at it.

    An explicit `name` is reused when it exists (so a stage can resume or skip). Without one the
    name is `run-<model>-<data>-<n>` with the first free n; `os.mkdir` is atomic, so two runs
    started at the same moment always get distinct folders.

    Raises:
        InputError: when `name` is not a valid run name.
    """
    project.outputs.mkdir(parents=True, exist_ok=True)
    if name is not None:
        validate_name(name)
        (project.outputs / name).mkdir(exist_ok=True)
    else:
        prefix = f"run-{slug(model)}-{slug(data)}-"
        taken = [
            int(p.name[len(prefix):])
            for p in project.outputs.glob(prefix + "*")
            if p.name[len(prefix):].isdigit()
        ]
        n = max(taken, default=0) + 1
        while True:
            name = f"{prefix}{n}"
            try:
                os.mkdir(project.outputs / name)
                break
            except FileExistsError:
                n += 1
    run = RunDir(project, name)
    run.log_root.mkdir(parents=True, exist_ok=True)
    project.set_latest(name)
    log.info("run %s (outputs/%s)", name, name)
    return run


def open_run(project: Project, name: str | None = None) -> RunDir:
    """An existing run: `name`, or the one in outputs/latest.txt (the choice is logged).

    Raises:
        InputError: no such run, or no run at all, naming the command that creates one.
    """
    if name is None:
        name = project.latest_run_name()
        if name is None:
            raise InputError(
                f"no run yet in {project.rel(project.outputs)}/ (no latest.txt)",
                hint="ftpipe finetune-sft (or pass --run NAME)",
            )
        log.info("using the latest run %s (from outputs/latest.txt; pass --run to choose)", name)
    validate_name(name)
    run = RunDir(project, name)
    if not run.path.is_dir():
        raise InputError(
            f"run {name!r} not found under {project.rel(project.outputs)}/",
            hint="ftpipe runs list",
        )
    return run


def run_summary(run: RunDir) -> dict[str, Any]:
    """One run (for `ftpipe runs show`): each stage's status, timings and metrics from its manifest."""
    from ftpipe.core.manifest import read_manifest  # manifest.py imports this module

    stages = {}
    for stage in run.stages():
        m = read_manifest(run.manifest_path(stage)) or {"status": "unreadable"}
        stages[stage] = {
            "status": m.get("status"),
            "started_at": m.get("started_at"),
            "finished_at": m.get("finished_at"),
            "metrics": m.get("metrics", {}),
            "error": m.get("error"),
        }
    return {"name": run.name, "latest": run.project.latest_run_name() == run.name, "stages": stages}


def all_runs(project: Project) -> list[dict[str, Any]]:
    """Summaries of every run, oldest name first (for `ftpipe runs list`)."""
    return [run_summary(RunDir(project, name)) for name in project.run_names()]
