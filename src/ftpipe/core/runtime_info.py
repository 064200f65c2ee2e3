"""What `ftpipe print-runtime` reports: resolved paths, environments, devices, Docker.

Each environment's package versions are read by its own interpreter (a subprocess), so the report
is true for the venv that will run the stage, not for the one printing it.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from ftpipe.core.executor import ENVIRONMENTS, Environment, build_pid, docker_available, venv_dir, venv_python
from ftpipe.core.manifest import TRACKED_PACKAGES
from ftpipe.core.runs import Project, RunDir

_VERSIONS_SNIPPET = (
    "import importlib.metadata as m, json, platform\n"
    "out = {'python': platform.python_version()}\n"
    "for n in %r:\n"
    "    try: out[n] = m.version(n)\n"
    "    except m.PackageNotFoundError: pass\n"
    "print(json.dumps(out))\n"
) % (TRACKED_PACKAGES,)


def environment_versions(python: Path) -> dict[str, str] | None:
    """Package versions as seen by `python`; None when it does not exist or fails."""
    if not python.exists():
        return None
    try:
        proc = subprocess.run([str(python), "-c", _VERSIONS_SNIPPET], capture_output=True, text=True, timeout=60)
        return json.loads(proc.stdout) if proc.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError):
        return None


def environment_state(root: Path, env: Environment) -> str:
    """Whether an environment matches its lock file, as `scripts/bootstrap.sh` decides.

    bootstrap.sh records sha256(requirements/<env>.lock + scripts/post-install-<env>.sh) in the
    venv's `.ftpipe-lock` once the build completed; while it builds, `.ftpipe-building` holds its pid.

    Returns:
        "ready", "building (...)", "incomplete (...)", "stale (...)", "missing (...)" or
        "unmanaged (...)", each but the first with the command that fixes it.
    """
    checkout = Path(__file__).resolve().parents[3]
    fix = f"bash scripts/bootstrap.sh {env.name}"
    lock = checkout / "requirements" / f"{env.name}.lock"
    folder = venv_dir(root, env)
    build = build_pid(root, env)
    if build is not None:
        pid, alive = build
        return f"building (bootstrap.sh, pid {pid})" if alive else f"incomplete (a build stopped midway: {fix})"
    if not folder.exists():
        return f"missing ({fix})"
    marker = folder / ".ftpipe-lock"
    if not lock.is_file() or not marker.is_file():
        return f"unmanaged (not built by bootstrap.sh: {fix} rebuilds it)"
    post = checkout / "scripts" / f"post-install-{env.name}.sh"
    digest = hashlib.sha256(lock.read_bytes() + (post.read_bytes() if post.is_file() else b"")).hexdigest()
    if marker.read_text(encoding="utf-8").strip() != digest:
        return f"stale (requirements/{env.name}.lock changed: {fix})"
    return "ready"


def cpu_flags() -> set[str]:
    """CPU feature flags from /proc/cpuinfo (empty where unavailable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_native_bf16() -> bool:
    """True when the CPU has native bf16 dot products (AVX512-BF16 or AMX-BF16).

    oneDNN also "supports" bf16 on plain AVX-512 by emulation, which is several times slower than
    fp32 (docs/finetune.md, docs/awq.md), so the CPU flags are what counts, not
    `torch.ops.mkldnn._is_mkldnn_bf16_supported()`.
    """
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def devices() -> dict[str, Any]:
    """CUDA devices (when torch is importable here) and CPU bf16 support."""
    flags = cpu_flags()
    info: dict[str, Any] = {
        "cpu_bf16": cpu_native_bf16(),
        "cpu_flags": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}),
        "cuda": False,
        "cuda_devices": [],
    }
    try:
        import torch
    except ImportError:
        info["torch"] = None
        return info
    info["torch"] = torch.__version__
    info["threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        info["cuda"] = True
        info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda_bf16"] = torch.cuda.is_bf16_supported()
    return info


def runtime_report(loaded, run: RunDir | None, stages_by_environment: dict[str, list[str]]) -> dict[str, Any]:
    """The whole `print-runtime` report as JSON-able data (paths project-relative).

    Args:
        stages_by_environment: environment name -> the stages that run in it (from the stage table).
    """
    project = Project.from_config(loaded)
    cfg = loaded.config
    report: dict[str, Any] = {
        "project_root": str(project.root),
        "config": project.rel(loaded.source) if loaded.source else None,
        "runtime": cfg.runtime.mode,
        "prepared_dir": project.rel(project.prepared_dir(cfg.data.name)),
        "model": {"id": cfg.model.id, "revision": cfg.model.revision, "path": cfg.model.path},
    }
    if run is not None:
        served = {"merged": run.merged, "awq": run.awq, "adapter": run.adapter, "gguf": run.gguf}
        report["run"] = {
            "name": run.name,
            "outputs": project.rel(run.path),
            "logs": project.rel(run.log_root),
            "adapter": project.rel(run.adapter),
            "trainer_state": project.rel(run.trainer_state),
            "merged": project.rel(run.merged),
            "awq": project.rel(run.awq),
            "gguf": project.rel(run.gguf),
            "eval": project.rel(run.eval),
            "served_model_path": project.rel(served[cfg.serve.artifact]),
        }
    envs = {}
    for name, env in ENVIRONMENTS.items():
        python = venv_python(project.root, env)
        versions = environment_versions(python)
        envs[name] = {
            "venv": env.venv,
            "service": env.service,
            "installed": versions is not None,
            "state": environment_state(project.root, env),
            "stages": sorted(stages_by_environment.get(name, [])),
            "versions": versions or {},
        }
    report["environments"] = envs
    report["current_python"] = sys.version.split()[0]
    report["devices"] = devices()
    report["docker"] = docker_available()
    return report
