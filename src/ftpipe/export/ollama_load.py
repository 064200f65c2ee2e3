"""`ollama-load`: create an Ollama model from the run's GGUF, with an explicit chat template.

Pipeline position: export-gguf -> **ollama-load** (needs a running Ollama server; runs in the
train environment with the official `ollama` Python client).

    ftpipe ollama-load --config debug_config.yaml --run my-run --set ollama.host=http://127.0.0.1:11434
    ftpipe ollama-load --config debug_config.yaml --run my-run --dry-run   # no server: writes the Modelfile

The stage contract (`ftpipe/core/stage.py`):

- `check(ctx)`: a completed export-gguf that wrote the GGUF type `ollama.gguf` names.
- `plan(ctx) -> OllamaLoadPlan`: choose the chat-template family of the merged model by rendering
  (`template_check.choose_family`: the family whose Go template renders every probe conversation
  exactly as the HF template; otherwise refused with the first differing characters); stops = the
  family's turn markers + the end-of-turn tokens of `generation_config.json`; no family gets
  tools (see `chat_families`).
- `run(ctx, plan)` (Ollama REST API, through `ollama.Client`): `HEAD /api/blobs/sha256:<digest>`
  and upload the GGUF with `POST /api/blobs/sha256:<digest>` when the server lacks it;
  `POST /api/create` with `files`, the Go `template` and the `stop` parameters; then `POST
  /api/chat` once and require a non-empty answer that ends by stopping (`done_reason: "stop"`),
  not by hitting `max_tokens`. `--dry-run` writes instead the Modelfile it would send (FROM,
  TEMPLATE, PARAMETER stop) as `outputs/<run>/ollama/Modelfile`, and contacts no server.

The server's state is not ours, so this stage always runs (no skip); re-creating a model whose
blob the server has is cheap.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from ftpipe.core.errors import InputError, StageError
from ftpipe.core.stage import StageContext, StageResult, require_upstream
from ftpipe.core.runs import gguf_name
from ftpipe.export.artifacts import CHAT_TEMPLATE_FILE
from ftpipe.export.chat_families import ChatFamily
from ftpipe.export.template_check import choose_family, gguf_bos_text, stop_strings, tokenizer_renderer
from ftpipe.handoff.prepared import prompt, sample_conversations

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OllamaLoadPlan:
    """The GGUF to load and the template it gets, chosen before any server call."""

    gguf: Path  # outputs/<run>/gguf/model-<ollama.gguf>.gguf
    family: ChatFamily  # the chat-template family whose Go template renders as the HF template
    stop: tuple[str, ...]  # the family's turn markers, then the model's end-of-turn tokens
    model_name: str  # ollama.model_name, else the run's name
    dry_run: bool  # --dry-run: write `modelfile` instead of contacting the server
    modelfile: Path  # outputs/<run>/ollama/Modelfile


def check(ctx: StageContext) -> dict[str, Path]:
    """A completed export-gguf with the GGUF type `ollama.gguf` names.

    The stage always runs (it talks to a server): its row in the stage table takes no --force.

    Returns:
        The inputs: export-gguf's manifest and the GGUF file.

    Raises:
        InputError: no completed export-gguf, or the chosen GGUF missing.
    """
    require_upstream(ctx)
    gguf = _gguf(ctx)
    return {"export-gguf": ctx.run.manifest_path("export-gguf"), "gguf": gguf}


def _gguf(ctx: StageContext) -> Path:
    """outputs/<run>/gguf/ file of type `ollama.gguf`.

    Raises:
        InputError: export-gguf did not write it.
    """
    run, project, cfg = ctx.run, ctx.project, ctx.config.ollama
    gguf = run.gguf / gguf_name(cfg.gguf)
    if not gguf.is_file():
        raise InputError(
            f"{project.rel(gguf)} not found: ollama.gguf is {cfg.gguf} but export-gguf did not write it",
            hint=f"ftpipe export-gguf --run {run.name} --force --set 'gguf.outtypes=[{cfg.gguf}]'",
        )
    return gguf


def plan(ctx: StageContext) -> OllamaLoadPlan:
    """The template family of the merged model (chosen by rendering) and its stops.

    Raises:
        InputError: no family's Go template renders the HF template's text.
    """
    from transformers import AutoTokenizer

    run, project = ctx.run, ctx.project
    tokenizer = AutoTokenizer.from_pretrained(run.merged)
    family = choose_family(tokenizer_renderer(tokenizer) if tokenizer.chat_template else None, tokenizer.chat_template,
                           gguf_bos_text(tokenizer, run.merged), project.rel(run.merged / CHAT_TEMPLATE_FILE))
    return OllamaLoadPlan(
        gguf=_gguf(ctx),
        family=family,
        stop=tuple(stop_strings(family, tokenizer, run.merged)),
        model_name=ctx.config.ollama.model_name or run.name,
        dry_run=bool(ctx.options.get("dry_run")),
        modelfile=run.ollama / "Modelfile",
    )


def run(ctx: StageContext, plan: OllamaLoadPlan) -> StageResult:
    """Upload, create, chat (the template was chosen and checked in `plan`); or, with --dry-run,
    write the Modelfile instead.

    Raises:
        InputError: no Ollama server at ollama.host.
        StageError: the server refused a call, or the chat answer was empty or did not stop.
    """
    family = plan.family
    log.info("template family %s; stops %s; tools refused: %s", family.name, list(plan.stop), family.tools)
    if plan.dry_run:
        return _dry_run(ctx, plan)
    project, cfg = ctx.project, ctx.config.ollama
    digest, uploaded, reply = _create_and_chat(ctx, plan)
    answer = (reply.message.content or "").strip()
    metrics = {
        "ollama_model": plan.model_name,
        "host": cfg.host,
        "gguf": project.rel(plan.gguf),
        "digest": digest,
        "blob_uploaded": uploaded,
        "dry_run": False,
        "template_family": family.name,
        "stop": list(plan.stop),
        "tools": f"refused: {family.tools}",
        "chat_answer": answer[:200],
        "done_reason": reply.done_reason,
    }
    return StageResult(outputs=[], metrics=metrics, summary=f"Ollama model {plan.model_name} created on {cfg.host} "
                       f"({family.name} template); chat answered and stopped")


def _dry_run(ctx: StageContext, plan: OllamaLoadPlan) -> StageResult:
    """Write the Modelfile the /api/create call amounts to; no server contacted."""
    project, family, stop = ctx.project, plan.family, list(plan.stop)
    modelfile = write_modelfile(plan.modelfile, plan.gguf, family, stop)
    return StageResult(
        outputs=[modelfile],
        metrics={"dry_run": True, "modelfile": project.rel(modelfile), "gguf": project.rel(plan.gguf),
                 "template_family": family.name, "stop": stop, "tools": f"refused: {family.tools}"},
        summary=f"dry run (no server contacted): {family.name} template checked; Modelfile -> {project.rel(modelfile)}",
    )


def _create_and_chat(ctx: StageContext, plan: OllamaLoadPlan):
    """Upload the GGUF unless the server has it, create the model, chat once; the reply must stop.

    Returns:
        (the GGUF's blob digest, whether it was uploaded, the chat reply).

    Raises:
        InputError: no server at ollama.host.
        StageError: the server refused a call; the answer is empty or ran into ollama.max_tokens.
    """
    import httpx
    import ollama

    cfg, name, gguf, stop = ctx.config.ollama, plan.model_name, plan.gguf, list(plan.stop)
    client = ollama.Client(host=cfg.host, timeout=cfg.timeout)
    try:
        digest = "sha256:" + _sha256(gguf)
        uploaded = _ensure_blob(client, gguf, digest)
        created = client.create(
            model=name,
            files={gguf.name: digest},
            template=plan.family.template,
            parameters={"stop": stop},
            stream=False,
        )
        if created.status != "success":
            raise StageError(f"ollama /api/create for {name!r} ended with status {created.status!r}")
        log.info("created Ollama model %s (%s template, stops %s)", name, plan.family.name, stop)

        conversations, _ = sample_conversations(ctx.project, ctx.config.data.name, 1)
        messages = prompt(conversations[0])
        reply = client.chat(
            model=name, messages=messages, stream=False,
            options={"temperature": 0, "num_predict": cfg.max_tokens},
        )
    except (httpx.ConnectError, ConnectionError):  # the client re-raises ConnectError as ConnectionError
        raise InputError(
            f"no Ollama server at {cfg.host} (connection refused)",
            hint="start one (`ollama serve`, or `docker compose --profile ollama up -d ollama`) or set ollama.host",
        ) from None
    except ollama.ResponseError as exc:
        raise StageError(f"Ollama at {cfg.host} refused a call: {exc.error} (HTTP {exc.status_code})") from None

    if not (reply.message.content or "").strip():
        raise StageError(f"Ollama model {name!r} gave an empty answer to {messages[-1]['content']!r}")
    if reply.done_reason != "stop":
        raise StageError(
            f"Ollama model {name!r} did not stop within ollama.max_tokens={cfg.max_tokens} "
            f"(done_reason {reply.done_reason!r}): the template or stop strings do not match the model",
        )
    return digest, uploaded, reply


def write_modelfile(path: Path, gguf: Path, family: ChatFamily, stop: list[str]) -> Path:
    """The Modelfile equivalent of the /api/create call: FROM (relative to the Modelfile, as
    `ollama create -f` resolves it), TEMPLATE, one PARAMETER stop per stop string.

    Raises:
        StageError: the template contains \"\"\" (it could not be quoted in a Modelfile).
    """
    import json
    import os

    if '"""' in family.template:
        raise StageError(f"the {family.name} template contains \"\"\" and cannot be written as a Modelfile TEMPLATE")
    lines = [
        f"# ftpipe ollama-load --dry-run: {family.name} chat template ({family.models})",
        f"# tools: refused ({family.tools})",
        f"FROM {os.path.relpath(gguf, path.parent)}",
        f'TEMPLATE """{family.template}"""',
        *(f"PARAMETER stop {json.dumps(s)}" for s in stop),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    log.info("wrote %s", path)
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _ensure_blob(client, path: Path, digest: str) -> bool:
    """Upload the GGUF unless the server already has it (HEAD /api/blobs/<digest> -> 200).

    Returns:
        True when it was uploaded.
    """
    import ollama

    try:
        # The client has no public "blob exists" call; this is the documented HEAD endpoint.
        client._request_raw("HEAD", f"/api/blobs/{digest}")
        log.info("the server already has %s", digest)
        return False
    except ollama.ResponseError as exc:
        if exc.status_code != 404:
            raise
    got = client.create_blob(path)
    if got != digest:
        raise StageError(f"uploaded blob digest {got} differs from {digest}")
    log.info("uploaded %s (%d bytes) as %s", path.name, path.stat().st_size, digest)
    return True
