"""What `serve` starts and `smoke-test` talks to: the served artifact of a run and its address.

Shared by the two stages of the serve package (ftpipe/serve/serve.py, ftpipe/serve/smoke_test.py):
which folder or GGUF file an artifact is (found through the manifest of the stage that produced
it: the `producers` mapping the caller hands in, `StageContext.producers` for smoke-test, the
stage table's `producers()` from the serve command; this package never imports the table), the
names clients use (the run name; with `adapters`, <run>-base, <run>-sft and <run>-dpo), and the
URL a local client uses. LoRA adapters vLLM cannot load (DoRA, vllm-project/vllm#10849;
`modules_to_save`, #9280) are refused here, before a server starts.

    ftpipe serve --config debug_config.yaml --artifact merged --detach
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from ftpipe.core.errors import InputError
from ftpipe.core.fsutil import read_json
from ftpipe.core.runs import RunDir
from ftpipe.core.stage import require_completed, upstream_state
from ftpipe.handoff.base_model import read_base_model

log = logging.getLogger(__name__)

LOOPBACK = {"127.0.0.1", "::1", "localhost"}
# serve --artifact adapters: each LoRA adapter of a run (an artifact of `producers`) and the suffix
# of its served name, <run>-<suffix>. The base answers as <run>-base.
ADAPTERS = (("adapter", "sft"), ("dpo_adapter", "dpo"))


@dataclass(frozen=True)
class Served:
    """What a server is started on: the artifact, its server kind and the names clients use."""

    artifact: str
    kind: str  # "vllm" or "llama.cpp"
    model: str  # folder or .gguf file (absolute), or a hub id for an adapter's remote base
    name: str  # the served model name = the run name (adapters: <run>-sft)
    upstream_manifest: Path
    tokenizer_dir: Path | None  # HF tokenizer matching what the server applies (template check)
    loras: tuple[tuple[str, Path], ...] = ()  # (served name, adapter folder), vLLM --lora-modules
    lora_rank: int | None = None  # the largest r among `loras`
    base_revision: str | None = None
    baseline: str | None = None  # the base's served name next to LoRA adapters (<run>-base)

    @property
    def names(self) -> tuple[str, ...]:
        """The model names smoke-test checks: with `adapters` the base first, then each adapter; else
        the one name clients use (with `adapter` the server also answers as <run>-base, unchecked)."""
        if self.artifact != "adapters":
            return (self.name,)
        return (*([self.baseline] if self.baseline else []), *(n for n, _ in self.loras))


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


def resolve_artifact(run: RunDir, artifact: str, gguf_type: str = "q8_0", *, producers: Mapping[str, str]) -> Served:
    """Find the artifact to serve through its upstream manifest.

    Args:
        run: the run whose artifact is served.
        artifact: merged, awq, adapter, adapters or gguf (serve.artifact).
        gguf_type: which of export-gguf's files (serve.gguf_type).
        producers: artifact name -> the stage that produces it (`StageContext.producers`); the
            artifact's folder is outputs/<run>/<artifact>.

    Raises:
        InputError: the upstream stage has not completed, or its output is missing/incomplete,
            naming the command that produces it.
    """
    # `adapters` needs the SFT adapter; the DPO adapter joins it when finetune-dpo completed.
    stage = producers["adapter" if artifact == "adapters" else artifact]
    command = f"ftpipe {stage}"
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
    if artifact in ("adapter", "adapters"):
        # adapter: the SFT adapter as <run>; adapters: every adapter whose stage completed, <run>-<suffix>.
        wanted = [("adapter", run.name)] if artifact == "adapter" else [
            (produced, f"{run.name}-{suffix}") for produced, suffix in ADAPTERS
            if produced in producers and (produced == "adapter" or _completed(run, produced, producers))]
        loras, ranks, problems = [], [], []
        for produced, served_name in wanted:
            folder = run.path / produced
            cfg = read_json(folder / "adapter_config.json")
            if not isinstance(cfg, dict):
                raise InputError(
                    f"run {run.name}: {project.rel(folder)}/ lacks adapter_config.json",
                    hint=f"ftpipe {producers[produced]} --run {run.name} --force",
                )
            problems += unservable_lora(cfg, project.rel(folder))
            loras.append((served_name, folder))
            ranks.append(int(cfg.get("r") or 16))
        if problems:
            raise InputError("; ".join(problems),
                             hint=f"ftpipe export-merged --run {run.name}, then ftpipe serve --run {run.name} --artifact merged")
        base = read_base_model(run)  # a local folder, else the hub id vLLM loads
        return Served(
            artifact, "vllm", base.load_from, loras[0][0], upstream, loras[0][1],
            loras=tuple(loras), lora_rank=max(ranks), base_revision=None if base.path else base.revision,
            baseline=f"{run.name}-base",
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


def unservable_lora(adapter_config: dict, where: str) -> list[str]:
    """Why vLLM cannot serve this LoRA adapter (empty: it can), one line per reason, naming it.

    vLLM loads neither DoRA adapters (`use_dora`, vllm-project/vllm#10849) nor adapters carrying
    full copies of modules (`modules_to_save`, #9280; vLLM 0.32 takes only a classifier / score head
    of a classification model, which a causal LM fine-tune never has): both are served merged.
    """
    problems = []
    if adapter_config.get("use_dora"):
        problems.append(f"serve: {where} is a DoRA adapter (use_dora: true), which vLLM cannot serve "
                        "(vllm-project/vllm#10849): serve the merged model")
    if adapter_config.get("modules_to_save"):
        modules = ", ".join(map(str, adapter_config["modules_to_save"]))
        problems.append(f"serve: {where} has modules_to_save ({modules}), which vLLM cannot serve "
                        "(vllm-project/vllm#9280): serve the merged model")
    return problems


def _completed(run: RunDir, produced: str, producers: Mapping[str, str]) -> bool:
    """Whether the stage that produces `produced` completed in this run (absent or failed: not served)."""
    state = upstream_state(run, producers[produced])
    if state is not None:
        log.info("serve: %s not served: %s is %s", produced, producers[produced], state)
    return state is None
