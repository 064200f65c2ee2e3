"""What `serve` starts and `smoke-test` talks to: the served artifact of a run and its address.

Shared by the two stages of the serve package (ftpipe/serve/serve.py, ftpipe/serve/smoke_test.py):
which folder or GGUF file an artifact is (found through the manifest of the stage that produced
it, per the stage table), the name clients use (the run name), and the URL a local client uses.

    ftpipe serve --config debug_config.yaml --artifact merged --detach
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ftpipe.core.errors import InputError
from ftpipe.core.fsutil import read_json
from ftpipe.core.runs import RunDir
from ftpipe.core.stage import require_completed
from ftpipe.handoff.base_model import read_base_model
from ftpipe.stages import PRODUCED_BY

LOOPBACK = {"127.0.0.1", "::1", "localhost"}


@dataclass(frozen=True)
class Served:
    """What a server is started on: the artifact, its server kind and the names clients use."""

    artifact: str
    kind: str  # "vllm" or "llama.cpp"
    model: str  # folder or .gguf file (absolute), or a hub id for an adapter's remote base
    name: str  # the served model name = the run name
    upstream_manifest: Path
    tokenizer_dir: Path | None  # HF tokenizer matching what the server applies (template check)
    lora: Path | None = None
    lora_rank: int | None = None
    base_revision: str | None = None


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    return host in LOOPBACK or host.startswith("127.")


def client_host(host: str) -> str:
    """The address a local client uses to reach a server bound to `host`."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def base_url(host: str, port: int) -> str:
    """http://<host>:<port> as seen from this machine (no /v1)."""
    h = client_host(host)
    return f"http://[{h}]:{port}" if ":" in h else f"http://{h}:{port}"


def resolve_artifact(run: RunDir, artifact: str, gguf_type: str = "q8_0") -> Served:
    """Find the artifact to serve through its upstream manifest.

    Raises:
        InputError: the upstream stage has not completed, or its output is missing/incomplete,
            naming the command that produces it.
    """
    stage, command = PRODUCED_BY[artifact].name, PRODUCED_BY[artifact].command
    manifest = require_completed(run, stage, command)
    project = run.project
    upstream = run.manifest_path(stage)
    if artifact in ("merged", "awq"):
        folder = run.merged if artifact == "merged" else run.awq
        if not (folder / "config.json").is_file():
            raise InputError(
                f"run {run.name}: no model in {project.rel(folder)}/ (config.json missing)",
                hint=f"{command} --run {run.name} --force",
            )
        return Served(artifact, "vllm", str(folder), run.name, upstream, folder)
    if artifact == "adapter":
        folder = run.adapter
        cfg = read_json(folder / "adapter_config.json")
        if not isinstance(cfg, dict):
            raise InputError(
                f"run {run.name}: {project.rel(folder)}/ lacks adapter_config.json",
                hint=f"{command} --run {run.name} --force",
            )
        base = read_base_model(run)  # a local folder, else the hub id vLLM loads
        return Served(
            artifact, "vllm", base.load_from, run.name, upstream, folder,
            lora=folder, lora_rank=int(cfg.get("r") or 16), base_revision=None if base.path else base.revision,
        )
    # gguf: pick the file of the requested type among the export-gguf outputs.
    files = sorted(
        {project.resolve(r["path"]) for r in manifest.get("outputs", []) if str(r["path"]).endswith(".gguf")}
    )
    matches = [f for f in files if gguf_type.lower() in f.name.lower()]
    if len(matches) != 1 or not matches[0].is_file():
        found = ", ".join(f.name for f in files) or "none"
        raise InputError(
            f"run {run.name}: expected one {gguf_type} GGUF among the export-gguf outputs, found: {found}",
            hint=f"set serve.gguf_type to one of them, or ftpipe export-gguf --run {run.name}",
        )
    return Served(artifact, "llama.cpp", str(matches[0]), run.name, upstream, None)
