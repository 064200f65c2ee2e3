"""smoke-test against a server that fails: one line, exit 1, manifest `failed`, never a traceback.

A stub OpenAI server on 127.0.0.1 lists the run's model, then fails the chat request in one of the
ways servers fail: HTTP 500 (what vLLM answers when its engine died), a reset connection, a request
that outlives smoke_test.timeout, a 200 whose body is not JSON, and a 200 without choices. When it
fails it appends vLLM-shaped error lines to logs/<run>/serve/server.log, where `ftpipe serve` writes
a server's output; an older failure already sits in that log and must not be quoted. The same
contract against a real vLLM that fails: tests/serve/test_serve_awq.py.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from pathlib import Path

import pytest
from conftest import run_cli

from serve.helpers import fabricate_merged, free_port, require_serve_env, write_project

STALE = ("(EngineCore pid=11) ERROR 12-07 00:01:02 [core.py:1] Traceback (most recent call last):\n"
         "(EngineCore pid=11) ERROR 12-07 00:01:02 [core.py:1] ValueError: an old failure, not this one\n")
CAUSE = "RuntimeError: Worker failed with error ''_OpNamespace' '_C' object has no attribute 'cpu_gemm_wna16''"
LOGGED = ("(Worker pid=42) ERROR 12-07 00:04:52 [multiproc_executor.py:1063] Traceback (most recent call last):\n"
          f"(EngineCore pid=41) ERROR 12-07 00:04:52 [core.py:1512] {CAUSE}\n"
          "(APIServer pid=40) ERROR 12-07 00:04:52 [async_llm.py:906] vllm.v1.engine.exceptions.EngineDeadError: "
          "EngineCore encountered an issue. See stack trace (above) for the root cause.\n")


class Stub:
    def __init__(self, log: Path) -> None:
        self.mode, self.log = "500", log
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # /v1/models
                self._send(200, json.dumps({"object": "list", "data": [
                    {"id": "run-s", "object": "model", "created": 0, "owned_by": "stub"}]}).encode())

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                with open(stub.log, "a", encoding="utf-8") as out:
                    out.write(LOGGED)
                if stub.mode == "500":
                    self._send(500, b'{"error":{"message":"EngineCore encountered an issue. See stack trace (above) '
                                    b'for the root cause.","type":"InternalServerError","param":null,"code":500}}')
                elif stub.mode == "reset":
                    self.connection.shutdown(2)
                    self.connection.close()
                elif stub.mode == "timeout":
                    time.sleep(4)
                    self._send(200, b"{}")
                elif stub.mode == "not-json":
                    self._send(200, b'{"choices": [oops')
                else:  # no-choices
                    self._send(200, b'{"id": "chatcmpl-1", "object": "chat.completion"}')

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def stub_project(tmp_path_factory, answering_model):
    require_serve_env()
    root = tmp_path_factory.mktemp("smoke-failures")
    log = root / "logs/run-s/serve/server.log"
    log.parent.mkdir(parents=True)
    stub = Stub(log)
    config = write_project(root, answering_model, stub.port, config={"smoke_test": {"timeout": 2}})
    fabricate_merged(root, "run-s", answering_model)
    yield root, config, stub
    stub.server.shutdown()


EXPECTED = {
    "500": r"POST /v1/chat/completions answered HTTP 500 \(EngineCore encountered an issue\.",
    "reset": r"POST /v1/chat/completions got no answer: APIConnectionError \(\w+(Error|Exception)",
    "timeout": r"POST /v1/chat/completions got no answer: APITimeoutError \(ReadTimeout: timed out\) within smoke_test\.timeout",
    "not-json": r"POST /v1/chat/completions answered something that is not the API's JSON",
    "no-choices": r"POST /v1/chat/completions answered something that is not the API's JSON \(a chat completion without choices",
}


@pytest.mark.parametrize("mode", list(EXPECTED))
def test_a_failing_server_is_one_line_with_the_cause_from_its_log(stub_project, mode):
    import re

    root, config, stub = stub_project
    stub.mode = mode
    log = root / "logs/run-s/serve/server.log"
    log.write_text(STALE, encoding="utf-8")  # an older failure: not the cause of this one
    result = run_cli("smoke-test", "--config", str(config), "--run", "run-s", timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.code == 1 and len(errors) == 1, result.output
    line = errors[0]
    assert line.startswith(f"error: smoke-test: the server at http://127.0.0.1:{stub.port}/v1 failed: "), line
    assert re.search(EXPECTED[mode], line), line
    assert f"logs/run-s/serve/server.log says: {CAUSE}" in line, line
    assert "old failure" not in line and line.endswith("(next: read logs/run-s/serve/server.log)"), line
    assert "Traceback" not in result.output
    manifest = json.loads((root / "logs/run-s/smoke-test/manifest.json").read_text())
    assert manifest["status"] == "failed" and CAUSE in manifest["error"]


def test_debug_shows_the_traceback(stub_project):
    root, config, stub = stub_project
    stub.mode = "500"
    result = run_cli("smoke-test", "--config", str(config), "--run", "run-s", env={"FTPIPE_DEBUG": "1"}, timeout=300)
    assert result.code != 0 and "Traceback" in result.stderr and "StageError" in result.stderr


def test_another_servers_log_is_not_quoted(stub_project):
    """With smoke_test.base_url the server is not ftpipe's: the run's serve log is not its log."""
    root, config, stub = stub_project
    stub.mode = "500"
    (root / "logs/run-s/serve/server.log").write_text(STALE, encoding="utf-8")
    result = run_cli("smoke-test", "--config", str(config), "--run", "run-s",
                     "--set", f"smoke_test.base_url=http://127.0.0.1:{stub.port}/v1", timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.code == 1 and len(errors) == 1, result.output
    assert "answered HTTP 500" in errors[0] and "no ftpipe server log for this address" in errors[0], errors[0]
    assert "server.log" not in errors[0] and "cpu_gemm_wna16" not in errors[0], errors[0]
