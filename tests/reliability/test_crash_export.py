"""SIGKILL `ftpipe export-merged`, `convert-awq` and `export-gguf` mid-way: the stage is never
`completed`, no half-written folder or file is taken as output (the output is absent, or the
previous complete one is left byte for byte), downstream stages refuse it, and a rerun finishes
and verifies.

The projects are the export tests' fabricated ones (tests/export/conftest.py: a real peft adapter
on the tiny Llama behind a genuine completed finetune-sft manifest; tests/export/test_awq.py: a
tiny merged model behind a completed export-merged manifest). convert-awq and export-gguf run in
their own venvs (.venv-awq, .venv-gguf) as children of the CLI: the kill takes the whole process
group, as a crash of the machine or an OOM kill of the container would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftpipe.core.errors import InputError
from ftpipe.core.fsutil import sha256_file
from tests.conftest import REPO, run_cli
from tests.export.conftest import fabricate_finetune, make_project


def _manifest(root: Path) -> dict | None:
    path = root / "logs/r1/export-merged/manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


@pytest.mark.slow
def test_sigkill_export_merged_midway_then_rerun(tmp_path, tiny_model_dir):
    root = make_project(tmp_path / "proj", tiny_model_dir)
    fabricate_finetune(root)
    env = {k: v for k, v in os.environ.items() if k != "FTPIPE_DEBUG"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ftpipe", "export-merged", "--config", str(root / "config.yaml"), "--run", "r1"],
        cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    run_dir = root / "outputs/r1"
    deadline = time.monotonic() + 300
    # Kill while the merged model is being written/verified in its temp folder.
    while not any(run_dir.glob(".merged.tmp-*")):
        assert proc.poll() is None, "export-merged finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    manifest = _manifest(root)
    assert manifest is not None and manifest["status"] == "running"  # never `completed`
    assert not (run_dir / "merged").exists()  # nothing half-written under the real name
    from ftpipe.config import load_config
    from ftpipe.core.runs import Project, RunDir
    from ftpipe.core.stage import require_completed

    run = RunDir(Project.from_config(load_config(root / "config.yaml")), "r1")
    with pytest.raises(InputError):
        require_completed(run, "export-merged", "ftpipe export-merged")  # downstream refuses it

    again = run_cli("export-merged", "--config", str(root / "config.yaml"), "--run", "r1", cwd=root)
    assert again.code == 0, again.output
    manifest = _manifest(root)
    assert manifest["status"] == "completed"
    assert manifest["metrics"]["max_abs_logit_diff"] < 1e-4
    assert (run_dir / "merged/model.safetensors").is_file()
    assert not any(p.name.startswith(".merged") for p in run_dir.iterdir())  # stale temp cleaned


# ---------------------------------------------------------------- convert-awq and export-gguf

def _start(root: Path, *argv: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "FTPIPE_DEBUG"}
    return subprocess.Popen(
        [sys.executable, "-m", "ftpipe", *argv, "--config", str(root / "config.yaml"), "--run", "r1"],
        cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )


def _kill_when(proc: subprocess.Popen, midway, what: str) -> None:
    """SIGKILL the whole process group (the CLI and its stage venv child) once `midway()` holds."""
    deadline = time.monotonic() + 600
    while not midway():
        if proc.poll() is not None:
            pytest.fail(f"finished (exit {proc.returncode}) before {what}: {proc.stderr.read().decode()[-2000:]}")
        assert time.monotonic() < deadline, f"{what}: timed out"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def _assert_refused_downstream(root: Path, stage: str, command: str) -> None:
    from ftpipe.config import load_config
    from ftpipe.core.runs import Project, RunDir
    from ftpipe.core.stage import require_completed

    manifest = json.loads((root / f"logs/r1/{stage}/manifest.json").read_text())
    assert manifest["status"] == "running"  # never `completed`
    run = RunDir(Project.from_config(load_config(root / "config.yaml")), "r1")
    with pytest.raises(InputError, match=f"stage {stage} is running"):
        require_completed(run, stage, command)


def _assert_completed_and_intact(root: Path, stage: str) -> dict:
    from ftpipe.config import load_config
    from ftpipe.core.manifest import outputs_intact
    from ftpipe.core.runs import Project

    manifest = json.loads((root / f"logs/r1/{stage}/manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert manifest["outputs"] and outputs_intact(Project.from_config(load_config(root / "config.yaml")), manifest)
    return manifest


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir())}


@pytest.mark.slow
def test_sigkill_convert_awq_midway_then_rerun(tmp_path):
    from ftpipe.core.config import TinyModelConfig
    from ftpipe.training.tiny_model import build
    from tests.export.test_awq import AWQ_SHAPE
    from tests.export.test_awq import make_project as make_awq_project

    model_dir = tmp_path / "tiny-awq"
    build(model_dir, TinyModelConfig(**AWQ_SHAPE), [REPO / "data/demo/sentiment.jsonl"])
    root = tmp_path / "proj"
    make_awq_project(root, model_dir)  # run r1 with a completed export-merged
    run_dir = root / "outputs/r1"

    def verifying() -> bool:  # quantized model saved in the temp folder, being reloaded and measured
        return any((t / "config.json").is_file() for t in run_dir.glob(".awq.tmp-*"))

    # 1. Killed while the new model is verified in its temp folder: no awq/ at all.
    _kill_when(_start(root, "convert-awq"), verifying, "the AWQ model was written to its temp folder")
    assert not (run_dir / "awq").exists()  # the half-written model exists only under its temp name
    assert any(run_dir.glob(".awq.tmp-*"))
    _assert_refused_downstream(root, "convert-awq", "ftpipe convert-awq")

    again = run_cli("convert-awq", "--config", str(root / "config.yaml"), "--run", "r1", cwd=root)
    assert again.code == 0, again.output[-3000:]
    manifest = _assert_completed_and_intact(root, "convert-awq")
    m = manifest["metrics"]
    assert m["quant_method"] == "compressed-tensors" and m["perplexity_increase"] <= m["max_perplexity_increase"]
    assert not any(p.name.startswith(".awq") for p in run_dir.iterdir())  # the stale temp folder is gone
    published = _hashes(run_dir / "awq")

    # 2. A forced rerun killed earlier, while it calibrates and quantizes (its temp folder exists):
    # the previous complete awq/ is untouched. (Recovering from this state is the rerun above;
    # the export-gguf test below reruns after this case too.)
    def quantizing() -> bool:
        return any(run_dir.glob(".awq.tmp-*"))

    _kill_when(_start(root, "convert-awq", "--force"), quantizing, "the forced rerun created its temp folder")
    assert _hashes(run_dir / "awq") == published
    _assert_refused_downstream(root, "convert-awq", "ftpipe convert-awq")


@pytest.mark.slow
def test_sigkill_export_gguf_midway_then_rerun(tmp_path, tiny_model_dir):
    from ftpipe.config import load_config
    from ftpipe.stages import run_stage

    root = make_project(tmp_path / "proj", tiny_model_dir)  # links .venv-gguf in
    fabricate_finetune(root)
    run_stage("export-merged", load_config(root / "config.yaml"), "r1")
    run_dir = root / "outputs/r1"

    def converting() -> bool:  # the converter has started writing a GGUF file in the temp folder
        return any(t.is_dir() and any(t.glob("*.gguf")) for t in run_dir.glob(".gguf.tmp-*"))

    # 1. Killed while the converter writes the first GGUF: no gguf/ at all.
    _kill_when(_start(root, "export-gguf"), converting, "a GGUF file appeared in the temp folder")
    assert not (run_dir / "gguf").exists()  # the half-written file exists only under the temp folder
    _assert_refused_downstream(root, "export-gguf", "ftpipe export-gguf")
    refused = run_cli("ollama-load", "--config", str(root / "config.yaml"), "--run", "r1", cwd=root)
    assert refused.code == 2 and "export-gguf" in refused.stderr, refused.output

    again = run_cli("export-gguf", "--config", str(root / "config.yaml"), "--run", "r1", cwd=root)
    assert again.code == 0, again.output[-3000:]
    manifest = _assert_completed_and_intact(root, "export-gguf")
    for t in ("f16", "q8_0"):  # the stage's own checks in llama.cpp passed on the rerun's files
        assert manifest["metrics"][f"{t}_greedy_equal"] == "3/3"
        assert manifest["metrics"][f"{t}_tokenization_equal"] is True
    assert sorted(p.name for p in (run_dir / "gguf").iterdir()) == ["model-f16.gguf", "model-q8_0.gguf"]
    assert not any(p.name.startswith(".gguf") for p in run_dir.iterdir())  # the stale temp folder is gone
    published = _hashes(run_dir / "gguf")

    # 2. A forced rerun killed at the same point: the previous complete gguf/ is untouched.
    _kill_when(_start(root, "export-gguf", "--force"), converting, "the forced rerun started converting")
    assert _hashes(run_dir / "gguf") == published
    _assert_refused_downstream(root, "export-gguf", "ftpipe export-gguf")
    final = run_cli("export-gguf", "--config", str(root / "config.yaml"), "--run", "r1", cwd=root)
    assert final.code == 0, final.output[-3000:]
    _assert_completed_and_intact(root, "export-gguf")
    assert not any(p.name.startswith(".gguf") for p in run_dir.iterdir())
