"""`ftpipe serve --artifact awq --detach` + smoke-test + `serve stop` on a real llm-compressor AWQ
(W4A16, compressed-tensors) output of the tiny answering model, served by vLLM on the CPU.

The AWQ model is made in the awq environment (tests/serve/make_awq.py); the server is started from
the training venv, so `serve` delegates itself into the serve environment and detaches.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import run_cli

from ftpipe.config import load_config
from ftpipe.core.runs import Project, new_run
from ftpipe.core.stage import StageContext, StageResult, execute
from serve.helpers import ANSWER, REPO, free_port, require_serve_env, write_project

pytestmark = pytest.mark.slow

AWQ_PYTHON = REPO / ".venv-awq" / "bin" / "python"
EAGER = "serve.extra_args=[--enforce-eager]"


@pytest.fixture(scope="module")
def awq_project(tmp_path_factory, answering_model):
    require_serve_env()
    assert AWQ_PYTHON.exists(), "the awq environment is missing: bash scripts/bootstrap.sh awq"
    root = tmp_path_factory.mktemp("serve-awq")
    quantized = root / "awq-model"
    proc = subprocess.run(
        [str(AWQ_PYTHON), str(Path(__file__).with_name("make_awq.py")), str(answering_model), str(quantized)],
        capture_output=True, text=True, timeout=1200, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert json.loads((quantized / "config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors"
    config = write_project(root, answering_model, free_port())
    loaded = load_config(config, environ={})
    run = new_run(Project.from_config(loaded), "run-awq")

    def body(ctx):
        shutil.copytree(quantized, run.awq)
        return StageResult(outputs=[run.awq])

    execute(StageContext.for_run("convert-awq", loaded, run), body, sections=("awq",), inputs={}, environment="awq")
    yield root, config
    state = root / "logs/run-awq/serve/server.json"
    if state.exists():  # a failed test left the detached server running
        run_cli("serve", "stop", "--config", str(config), "--run", "run-awq")


def test_awq_serve_detached_smoke_test_and_stop(awq_project):
    root, config = awq_project
    started = run_cli("serve", "--config", str(config), "--run", "run-awq", "--artifact", "awq", "--detach",
                      "--set", EAGER, timeout=1200)
    assert started.code == 0, started.output
    assert "serving 'run-awq' (awq, vllm)" in started.stdout
    assert "stop it with: ftpipe serve stop --run run-awq" in started.stdout
    state = json.loads((root / "logs/run-awq/serve/server.json").read_text())
    assert state["detached"] is True and state["artifact"] == "awq"
    pid = state["pid"]

    smoke = run_cli("smoke-test", "--config", str(config), "--run", "run-awq", "--artifact", "awq")
    assert smoke.code == 0, smoke.output
    assert "template matches, 3/3 prompt checks" in smoke.stdout
    results = json.loads((root / "logs/run-awq/smoke-test/results.json").read_text())
    assert results["artifact"] == "awq" and [a["answer"] for a in results["answers"]] == [ANSWER] * 3
    manifest = json.loads((root / "logs/run-awq/smoke-test/manifest.json").read_text())
    assert manifest["inputs"]["artifact"]["path"] == "logs/run-awq/convert-awq/manifest.json"

    stopped = run_cli("serve", "stop", "--config", str(config), "--run", "run-awq")
    assert stopped.code == 0, stopped.output
    assert f"stopped the server of run run-awq (pid {pid}" in stopped.stdout
    assert "killed" not in stopped.stdout
    assert not (root / "logs/run-awq/serve/server.json").exists()
    assert subprocess.run(["pgrep", "-g", str(pid)], capture_output=True).returncode == 1  # whole group gone

    again = run_cli("serve", "stop", "--config", str(config), "--run", "run-awq")
    assert again.code == 2 and "error: run run-awq: no running server" in again.stderr


