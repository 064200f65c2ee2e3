"""`ollama-load`: create an Ollama model from the run's GGUF, with an explicit chat template.

Pipeline position: export-gguf -> **ollama-load** (needs a running Ollama server; runs in the
train environment with the official `ollama` Python client).

    ftpipe ollama-load --config debug_config.yaml --run my-run --set ollama.host=http://127.0.0.1:11434

Steps (Ollama REST API, through `ollama.Client`): recognise the chat-template family of the merged
model (ChatML, Llama 3, Gemma, Mistral, Phi-3; anything else is refused) and check that its Go
template renders exactly the HF template's text; `HEAD /api/blobs/sha256:<digest>` and upload the
GGUF with `POST /api/blobs/sha256:<digest>` when the server lacks it; `POST /api/create` with
`files`, the Go `template` and the `stop` parameters; then `POST /api/chat` once and require a
non-empty answer that ends by stopping (`done_reason: "stop"`), not by hitting `max_tokens`.
The server's state is not ours, so this stage always runs (no skip); re-creating a model whose
blob the server has is cheap.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from ftpipe.core.errors import InputError, StageError
from ftpipe.core.stage import StageContext, StageResult, require_upstream
from ftpipe.export.artifacts import CHAT_TEMPLATE_FILE, gguf_name
from ftpipe.handoff.prepared import prompt, sample_conversations
from ftpipe.export.chat_families import ChatFamily, detect_family
from ftpipe.export.gotemplate import ollama_values, render

log = logging.getLogger(__name__)

TEMPLATE_CHECK = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Hi, who are you?"},
    {"role": "assistant", "content": "An assistant."},
    {"role": "user", "content": "Name two colours."},
]


def prepare(ctx: StageContext) -> dict[str, Path]:
    """The GGUF to load (`ctx.options["gguf"]`) and a chat template whose family is known.

    The stage always runs (it talks to a server): its row in the stage table takes no --force.

    Raises:
        InputError: no completed export-gguf, the chosen GGUF missing, unknown template family.
    """
    require_upstream(ctx)
    run, project, cfg = ctx.run, ctx.project, ctx.config.ollama
    gguf = run.gguf / gguf_name(cfg.gguf)
    if not gguf.is_file():
        raise InputError(
            f"{project.rel(gguf)} not found: ollama.gguf is {cfg.gguf} but export-gguf did not write it",
            hint=f"ftpipe export-gguf --run {run.name} --force --set 'gguf.outtypes=[{cfg.gguf}]'",
        )
    template_file = run.merged / CHAT_TEMPLATE_FILE
    detect_family(template_file.read_text(encoding="utf-8") if template_file.is_file() else None, project.rel(template_file))
    ctx.options["gguf"] = gguf
    return {"export-gguf": run.manifest_path("export-gguf"), "gguf": gguf}


def run(ctx: StageContext) -> StageResult:
    """Check the template, upload, create, chat."""
    import httpx
    import ollama
    from transformers import AutoTokenizer

    run, project, cfg = ctx.run, ctx.project, ctx.config.ollama
    gguf: Path = ctx.options["gguf"]
    tokenizer = AutoTokenizer.from_pretrained(run.merged)
    family = detect_family(tokenizer.chat_template, project.rel(run.merged / CHAT_TEMPLATE_FILE))
    check_template(family, tokenizer)
    name = cfg.model_name or run.name
    client = ollama.Client(host=cfg.host, timeout=cfg.timeout)

    try:
        digest = "sha256:" + _sha256(gguf)
        uploaded = _ensure_blob(client, gguf, digest)
        created = client.create(
            model=name,
            files={gguf.name: digest},
            template=family.template,
            parameters={"stop": list(family.stop)},
            stream=False,
        )
        if created.status != "success":
            raise StageError(f"ollama /api/create for {name!r} ended with status {created.status!r}")
        log.info("created Ollama model %s (%s template, stops %s)", name, family.name, list(family.stop))

        conversations, _ = sample_conversations(project, ctx.config.data.name, 1)
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

    answer = (reply.message.content or "").strip()
    if not answer:
        raise StageError(f"Ollama model {name!r} gave an empty answer to {messages[-1]['content']!r}")
    if reply.done_reason != "stop":
        raise StageError(
            f"Ollama model {name!r} did not stop within ollama.max_tokens={cfg.max_tokens} "
            f"(done_reason {reply.done_reason!r}): the template or stop strings do not match the model",
        )
    metrics = {
        "ollama_model": name,
        "host": cfg.host,
        "gguf": project.rel(gguf),
        "digest": digest,
        "blob_uploaded": uploaded,
        "template_family": family.name,
        "stop": list(family.stop),
        "chat_answer": answer[:200],
        "done_reason": reply.done_reason,
    }
    return StageResult(outputs=[], metrics=metrics, summary=f"Ollama model {name} created on {cfg.host} ({family.name} template); chat answered and stopped")


def check_template(family: ChatFamily, tokenizer) -> None:
    """The Go template must render the HF template's text (BOS aside) for a system + two-turn chat.

    Raises:
        StageError: the texts differ (a prompt Ollama would build differently from training).
    """
    expected = tokenizer.apply_chat_template(TEMPLATE_CHECK, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token or ""
    if bos and expected.startswith(bos):
        expected = expected[len(bos):]  # Ollama's tokenizer adds BOS itself
    got = render(family.template, ollama_values(TEMPLATE_CHECK))
    if got != expected:
        first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
        raise StageError(
            f"the {family.name} Ollama template renders differently from the model's chat template at "
            f"character {first}: {got[first:first + 40]!r} vs {expected[first:first + 40]!r}",
            hint="create the Ollama model by hand with a Modelfile TEMPLATE matching chat_template.jinja",
        )


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
