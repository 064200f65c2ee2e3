"""The executor: the only place that knows about venvs and containers.

Each stage names its environment in the stage table (ftpipe/stages.py); the Python stacks cannot
share one venv (llm-compressor and vLLM's CPU build each pin their own transformers and torch:
docs/setup.md lists the pins). Locally a stage runs in `.venv`, `.venv-awq`,
`.venv-serve` or `.venv-gguf`; with `--runtime compose` the host CLI runs the same `ftpipe <stage>`
command inside the matching Compose service, with the project mounted at the same layout
(`runtime.container_root`) and the host's UID/GID.

    ftpipe convert-awq --run my-run            # re-executes itself in .venv-awq when needed
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ftpipe.core.errors import InputError, StageError
from ftpipe.core.secrets import redact

log = logging.getLogger(__name__)

ENV_MARKER = "FTPIPE_ENV"  # set to the environment name inside a stage environment


@dataclass(frozen=True)
class Environment:
    """One stage environment: a local venv and a Compose service with the same stack."""

    name: str
    venv: str
    service: str
    extra: str


ENVIRONMENTS: dict[str, Environment] = {
    "train": Environment("train", ".venv", "sft", "train"),
    "awq": Environment("awq", ".venv-awq", "awq-runner", "awq"),
    "serve": Environment("serve", ".venv-serve", "vllm-server", "serve"),
    "gguf": Environment("gguf", ".venv-gguf", "llama-cpp", "gguf"),
}

def environment(name: str) -> Environment:
    """An environment by name (the stage table names each stage's environment)."""
    return ENVIRONMENTS[name]


def _checkout_root() -> Path:
    # src/ftpipe/core/executor.py -> the checkout holding the venvs of an editable install.
    return Path(__file__).resolve().parents[3]


def venv_dir(root: Path, env: Environment) -> Path:
    """Where an environment's venv lives: $FTPIPE_VENV_ROOT, else the project root when it has
    one, else the ftpipe checkout (so a project folder elsewhere reuses the installed venvs)."""
    override = os.environ.get("FTPIPE_VENV_ROOT")
    if override:
        return Path(override) / env.venv
    local = Path(root) / env.venv
    if local.exists():
        return local
    installed = _checkout_root() / env.venv
    return installed if installed.exists() else local


def venv_python(root: Path, env: Environment) -> Path:
    """The interpreter of an environment's local venv."""
    return venv_dir(root, env) / "bin" / "python"


def in_environment(root: Path, env: Environment) -> bool:
    """True when this process already runs in `env` (its venv, or its container)."""
    if os.environ.get(ENV_MARKER) == env.name:
        return True
    return Path(sys.prefix).resolve() == venv_dir(root, env).resolve()


BUILDING = ".ftpipe-building"  # scripts/bootstrap.sh writes its pid here while it builds a venv


def build_pid(root: Path, env: Environment) -> tuple[int | None, bool] | None:
    """(pid, alive) of the bootstrap.sh build marked in the environment's venv; None if none is.

    A marker without a readable pid is (None, False): a build that stopped midway.
    """
    try:
        text = (venv_dir(root, env) / BUILDING).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except OSError:
        return None, False
    pid = int(text) if text.isdigit() else None
    return pid, pid is not None and Path(f"/proc/{pid}").exists()


def installed(root: Path, env: Environment) -> bool:
    """True when the environment's venv has an interpreter, or bootstrap.sh is building it now."""
    build = build_pid(root, env)
    return venv_python(root, env).exists() or (build is not None and build[1])


def build_log(root: Path, env: Environment) -> Path:
    """Where `bootstrap.sh --background` writes an environment's build output."""
    return venv_dir(root, env).parent / "logs" / "bootstrap" / f"{env.name}.log"


def wait_for_build(root: Path, env: Environment, poll_s: float = 1.0, report_s: float = 30.0) -> float:
    """Wait while bootstrap.sh (e.g. `--background`, started by scripts/demo.sh) builds the venv.

    Logs what it waits for when it starts and every `report_s` seconds. Returns the seconds waited.

    Raises:
        InputError: the build stopped without finishing, naming its log and the command to rerun.
    """
    started = time.monotonic()
    reported = None
    while True:
        build = build_pid(root, env)
        if build is None:
            break
        pid, alive = build
        waited = time.monotonic() - started
        if not alive:
            logfile = build_log(root, env)
            where = f"; its output: {logfile}" if logfile.is_file() else ""
            raise InputError(
                f"environment {env.name!r} did not finish building ({env.venv}/ is incomplete{where})",
                hint=f"bash scripts/bootstrap.sh {env.name}",
            )
        if reported is None or waited - reported >= report_s:
            logfile = build_log(root, env)
            log.info(
                "waiting for environment %s: bootstrap.sh (pid %s) is still building %s (%.0f s so far%s)",
                env.name, pid, env.venv, waited, f"; log: {logfile}" if logfile.is_file() else "",
            )
            reported = waited
        time.sleep(poll_s)
    waited = time.monotonic() - started
    if reported is not None:
        log.info("environment %s is ready (waited %.0f s)", env.name, waited)
    return waited


def local_command(root: Path, env: Environment, argv: list[str]) -> list[str]:
    """argv that runs `ftpipe <argv>` in the environment's local venv, once any build of it is done.

    Raises:
        InputError: the venv is missing or its build stopped midway, naming the command that fixes it.
    """
    wait_for_build(root, env)
    python = venv_python(root, env)
    if not python.exists():  # not in the project, not in the ftpipe checkout
        raise InputError(
            f"environment {env.name!r} is not installed ({env.venv}/ missing)",
            hint=f"bash scripts/bootstrap.sh {env.name}",
        )
    return [str(python), "-m", "ftpipe", *argv]


def compose_command(
    root: Path,
    env: Environment,
    argv: list[str],
    compose_file: str = "docker-compose.yml",
    uid: int | None = None,
    gid: int | None = None,
) -> list[str]:
    """argv that runs `ftpipe <argv>` in the environment's Compose service as the host user.

    The compose file mounts the project root at the same place in every service, so the relative
    paths in argv and in manifests mean the same inside and outside.
    """
    uid = os.getuid() if uid is None else uid
    gid = os.getgid() if gid is None else gid
    return [
        "docker", "compose", "-f", str(root / compose_file),
        "run", "--rm", "--user", f"{uid}:{gid}",
        "-e", f"{ENV_MARKER}={env.name}", "-e", f"FTPIPE_SERVICE={env.service}",
        env.service, "ftpipe", *argv,
    ]


def docker_available() -> dict[str, bool]:
    """Whether the docker client, a running engine and the compose plugin are usable."""
    client = shutil.which("docker") is not None
    engine = compose = False
    if client:
        engine = _quiet(["docker", "info", "--format", "{{.ServerVersion}}"])
        compose = _quiet(["docker", "compose", "version"])
    return {"client": client, "engine": engine, "compose": compose}


def _quiet(argv: list[str]) -> bool:
    try:
        return subprocess.run(argv, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def compose_problems(root: Path, compose_file: str = "docker-compose.yml") -> list[str]:
    """What `--runtime compose` lacks here, every item at once (empty: it can run).

    The stack file comes first: it is the ftpipe repository's docker-compose.yml (next to the
    Dockerfiles it builds), and it mounts the folder it sits in as the project, so a project
    without it cannot run in Compose whatever the engine.
    """
    problems = []
    stack = Path(root) / compose_file
    if not stack.is_file():
        problems.append(
            f"no {compose_file} in the project {root} (runtime.compose_file): the Compose stack is the ftpipe "
            "repository's docker-compose.yml with its Dockerfiles, and it mounts the folder it sits in as the project"
        )
    docker = docker_available()
    if not docker["client"]:
        problems.append("no docker client on PATH")
    elif not docker["engine"]:
        problems.append("no Docker engine answers (`docker info` failed)")
    elif not docker["compose"]:
        problems.append("the docker client has no compose plugin (`docker compose version` failed)")
    elif stack.is_file():
        # `docker compose run` would build a missing image on the spot (pulling its base image):
        # ask for the documented `docker compose build` instead of starting that mid-pipeline.
        missing = [f"{service} ({image})" for service, image in service_images(stack).items() if not _quiet(
            ["docker", "image", "inspect", "--format", "{{.Id}}", image])]
        if missing:
            problems.append(f"image(s) not built: {', '.join(missing)} (`docker compose build`)")
    return problems


def service_images(stack: Path) -> dict[str, str]:
    """Service -> image name of the stage environments' services in a compose file (those with `image:`)."""
    import yaml

    services = (yaml.safe_load(stack.read_text(encoding="utf-8")) or {}).get("services") or {}
    wanted = [env.service for env in ENVIRONMENTS.values()]
    return {name: str(services[name]["image"]) for name in wanted
            if isinstance(services.get(name), dict) and services[name].get("image")}


def require_compose(root: Path, compose_file: str = "docker-compose.yml") -> None:
    """Raises InputError (one line, every problem) unless `--runtime compose` can run in `root`."""
    problems = compose_problems(root, compose_file)
    if not problems:
        return
    if not (Path(root) / compose_file).is_file():
        hint = "run from the ftpipe repository (copy your config and data into it) with a Docker engine and " \
               "`docker compose build` done, or use --runtime local (docs/compose.md)"
    elif problems[-1].startswith("image"):
        hint = "docker compose build (docs/compose.md), or use --runtime local"
    else:
        hint = "start the Docker engine (dockerd) with the compose plugin, or use --runtime local (docs/compose.md)"
    raise InputError("--runtime compose: " + "; ".join(problems), hint=hint)


def run_in_environment(root: Path, env_name: str, argv: list[str], runtime: str = "local", compose_file: str = "docker-compose.yml") -> int:
    """Run `ftpipe <argv>` in the environment `env_name`, streaming its output; returns the exit code.

    Raises:
        InputError: environment missing / Docker engine unavailable.
    """
    env = environment(env_name)
    if runtime == "compose":
        require_compose(root, compose_file)
        cmd = compose_command(root, env, argv, compose_file)
    else:
        cmd = local_command(root, env, argv)
    child_env = {**os.environ, ENV_MARKER: env.name}
    log.info("running %s in environment %s: %s", argv[0], env.name, redact(" ".join(cmd)))
    proc = subprocess.Popen(cmd, cwd=root, env=child_env)
    # Forward Ctrl-C / SIGTERM so the child saves a checkpoint or stops its server cleanly.
    previous = {s: signal.signal(s, lambda n, _f: proc.send_signal(n)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_tool(argv: list[str], log_file: Path | None = None, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float | None = None) -> str:
    """Run an external tool: list argv, output copied to `log_file`, failure raises.

    Returns:
        The tool's combined output.

    Raises:
        StageError: non-zero exit or timeout, with the command and the tail of its output.
    """
    shown = redact(" ".join(str(a) for a in argv))
    log.info("$ %s", shown)
    try:
        proc = subprocess.run(
            [str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        raise StageError(f"`{shown}` did not finish within {timeout:.0f}s") from None
    except FileNotFoundError:
        raise StageError(f"`{argv[0]}` not found") from None
    output = proc.stdout + proc.stderr
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "a", encoding="utf-8") as fh:
            fh.write(redact(f"$ {shown}\n{output}\n"))
    if proc.returncode != 0:
        tail = " | ".join(redact(output).strip().splitlines()[-3:])
        raise StageError(f"`{shown}` failed with exit {proc.returncode}: {tail}")
    return output
