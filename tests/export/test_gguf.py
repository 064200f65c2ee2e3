"""export-gguf on the tiny tied Llama: f16 and q8_0 GGUFs load in llama.cpp (llama-cpp-python in
.venv-gguf) and give HF's greedy tokens; the chat template and EOS are in the metadata; an
adapter-only input exits 2. The stage's own checks are recorded in its manifest; the test also
re-checks greedy tokens independently (HF here, llama.cpp in a .venv-gguf subprocess)."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import run_cli
from tests.export.conftest import REPO, fabricate_finetune, make_project
from tests.export.fake_ollama import FakeOllama

GGUF_PYTHON = REPO / ".venv-gguf/bin/python"
PROMPTS = [
    [{"role": "user", "content": "Label the review: the film was dull."}],
    [{"role": "system", "content": "You label reviews."}, {"role": "user", "content": "a moving story"}],
]
N_NEW = 8

LLAMA_CPP_GREEDY = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
path, prompts, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
llm = Llama(model_path=path, n_ctx=256, logits_all=True, verbose=False)
out = []
for ids in prompts:
    llm.reset(); llm.eval(ids); got = []
    for _ in range(n):
        t = int(np.argmax(llm.scores[llm.n_tokens - 1])); got.append(t); llm.eval([t])
    out.append(got)
print(json.dumps({"greedy": out, "template": llm.metadata.get("tokenizer.chat_template"),
                  "eos": llm.token_eos(), "eos_meta": llm.metadata.get("tokenizer.ggml.eos_token_id")}))
"""


@pytest.fixture(scope="module")
def gguf_project(tmp_path_factory, tiny_model_dir):
    from ftpipe.config import load_config
    from ftpipe.stages import run_stage

    root = make_project(tmp_path_factory.mktemp("proj-gguf"), tiny_model_dir)
    fabricate_finetune(root)
    run_stage("export-merged", load_config(root / "config.yaml"), "r1")
    result = run_cli("export-gguf", "--config", str(root / "config.yaml"), "--run", "r1", cwd=root)
    assert result.code == 0, result.output
    return root


@pytest.mark.slow
def test_gguf_f16_q8_0_match_hf(gguf_project):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = gguf_project / "outputs/r1/gguf"
    assert sorted(p.name for p in out.iterdir()) == ["model-f16.gguf", "model-q8_0.gguf"]
    assert not list((gguf_project / "outputs/r1").glob(".gguf*"))
    manifest = json.loads((gguf_project / "logs/r1/export-gguf/manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["environment"]["stage_environment"] == "gguf"
    m = manifest["metrics"]
    for t in ("f16", "q8_0"):
        assert m[f"{t}_greedy_equal"] == "3/3" and m[f"{t}_greedy_near_ties"] == 0
        assert m[f"{t}_tokenization_equal"] is True
        assert m[f"{t}_chat_template_present"] is True
        assert m[f"{t}_chat_template_roundtrip_equal"] is True
    # The converter ran once (f16); q8_0 was quantized from that file, as llama.cpp's workflow does.
    convert_log = (gguf_project / "logs/r1/export-gguf/convert.log").read_text()
    runs = [line for line in convert_log.splitlines() if line.startswith("$ ") and "gguf_convert" in line]
    assert len(runs) == 1 and runs[0].endswith("--outtype f16"), runs

    merged = gguf_project / "outputs/r1/merged"
    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    prompt_ids = [tok(tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True),
                      add_special_tokens=False)["input_ids"] for p in PROMPTS]
    hf = []
    with torch.no_grad():
        for ids in prompt_ids:
            seq = list(ids)
            for _ in range(N_NEW):
                seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
            hf.append(seq[len(ids):])
    for t in ("f16", "q8_0"):
        proc = subprocess.run(
            [str(GGUF_PYTHON), "-c", LLAMA_CPP_GREEDY, str(out / f"model-{t}.gguf"), json.dumps(prompt_ids), str(N_NEW)],
            capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        assert got["greedy"] == hf, t
        assert got["template"] == tok.chat_template
        assert got["eos"] == tok.eos_token_id == int(got["eos_meta"])


@pytest.mark.slow
def test_second_run_is_skipped_and_ollama_loads_the_real_gguf(gguf_project):
    again = run_cli("export-gguf", "--config", str(gguf_project / "config.yaml"), "--run", "r1", cwd=gguf_project)
    assert again.code == 0, again.output
    assert "export-gguf: up to date, skipped" in again.output
    with FakeOllama() as fake:
        result = run_cli("ollama-load", "--config", str(gguf_project / "config.yaml"), "--run", "r1",
                         "--set", f"ollama.host={fake.url}", cwd=gguf_project)
        assert result.code == 0, result.output
        assert [c[1].split(":")[0] for c in fake.calls] == ["/api/blobs/sha256", "/api/blobs/sha256", "/api/create", "/api/chat"]
        assert fake.blobs[fake.models["r1"]["files"]["model-q8_0.gguf"]] == (gguf_project / "outputs/r1/gguf/model-q8_0.gguf").stat().st_size


def test_llama_cpp_is_the_portable_build() -> None:
    """The gguf environment's llama.cpp is the AVX2 baseline of scripts/cmake/llama-cpp-lean.cmake,
    whatever CPU compiled it: a -march=native wheel from uv's cache would die (SIGILL) on a machine
    with fewer features, and its AMX path crashed llama_decode on q8_0 tiny models."""
    proc = subprocess.run([str(GGUF_PYTHON), "-c", "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    features = dict(item.strip().split(" = ") for item in proc.stdout.split("|") if " = " in item)
    assert features.get("AVX2") == "1" and features.get("FMA") == "1", proc.stdout
    assert not {"AVX512", "AMX_INT8", "AVX512_VNNI"} & set(features), proc.stdout


def test_adapter_only_input_exits_2(tmp_path, tiny_model_dir):
    root = make_project(tmp_path / "p", tiny_model_dir)
    fabricate_finetune(root)
    result = run_cli("export-gguf", "--config", str(root / "config.yaml"), "--run", "r1", cwd=root)
    assert result.code == 2, result.output
    assert ("error: outputs/r1/adapter holds only a LoRA adapter (adapter_config.json, no full weights); "
            "merge it into its base first") in result.stderr
    assert "(next: ftpipe export-merged --run r1)" in result.stderr
    explicit = run_cli("export-gguf", "--config", str(root / "config.yaml"), "--run", "r1",
                       "--from", "outputs/r1/adapter", cwd=root)
    assert explicit.code == 2
    assert "outputs/r1/adapter holds only a LoRA adapter" in explicit.stderr
    assert not (root / "outputs/r1/gguf").exists()


@pytest.mark.slow
def test_qwen2_untied_f16_and_q4_k_m(tmp_path, tiny_qwen_dir):
    """Qwen2 (untied, converter's gpt2 vocab path) and q4_k_m through the quantizer."""
    from ftpipe.config import load_config
    from ftpipe.stages import run_stage

    root = make_project(tmp_path / "q", tiny_qwen_dir)
    fabricate_finetune(root, seed=1)
    run_stage("export-merged", load_config(root / "config.yaml"), "r1")
    result = run_cli("export-gguf", "--config", str(root / "config.yaml"), "--run", "r1",
                     "--set", "gguf.outtypes=[f16, q4_k_m]", cwd=root)
    assert result.code == 0, result.output
    assert sorted(p.name for p in (root / "outputs/r1/gguf").iterdir()) == ["model-f16.gguf", "model-q4_k_m.gguf"]
    m = json.loads((root / "logs/r1/export-gguf/manifest.json").read_text())["metrics"]
    assert m["f16_greedy_equal"] == "3/3" and m["f16_chat_template_roundtrip_equal"] is True
    assert m["q4_k_m_chat_template_present"] is True and m["q4_k_m_tokenization_equal"] is True
    assert m["q4_k_m_bytes"] < m["f16_bytes"]


@pytest.mark.slow
def test_serve_the_gguf_with_llama_cpp_over_http(gguf_project):
    """`ftpipe serve --artifact gguf` starts llama-cpp-python's OpenAI server on 127.0.0.1 with the
    q8_0 GGUF; it answers a chat completion with the key and refuses one without; `serve stop` ends it."""
    import urllib.error
    import urllib.request

    from tests.serve.helpers import free_port

    port = free_port()
    config = str(gguf_project / "config.yaml")
    started = run_cli("serve", "--config", config, "--run", "r1", "--artifact", "gguf", "--port", str(port),
                      "--api-key", "gguf-test-key", "--detach", cwd=gguf_project, timeout=600)
    try:
        assert started.code == 0, started.output
        body = json.dumps({"model": "r1", "max_tokens": 4, "temperature": 0,
                           "messages": [{"role": "user", "content": "Review: great film. Sentiment?"}]}).encode()

        def chat(key: str | None):
            headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body, headers)
            with urllib.request.urlopen(request, timeout=120) as response:
                return json.loads(response.read())

        answer = chat("gguf-test-key")
        assert answer["choices"][0]["message"]["role"] == "assistant"
        assert answer["usage"]["completion_tokens"] >= 1
        with pytest.raises(urllib.error.HTTPError) as refused:
            chat(None)
        assert refused.value.code == 401
        state = json.loads((gguf_project / "logs/r1/serve/server.json").read_text())
        assert (state["kind"], state["artifact"], state["host"]) == ("llama.cpp", "gguf", "127.0.0.1")
        assert "gguf-test-key" not in json.dumps(state)
    finally:
        stopped = run_cli("serve", "stop", "--config", config, "--run", "r1", cwd=gguf_project)
    assert stopped.code == 0, stopped.output
