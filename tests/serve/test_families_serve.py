"""serve (vLLM on the CPU) + smoke-test per model family.

Every family: serve's pre-flight asks vLLM's model registry about the merged model's architecture
(`check_vllm_architecture`, run here in the serve environment on all six families' models, plus an
unknown architecture that must be refused). Two families get a real server: llama3 (untied,
128k vocabulary, <|eot_id|> among three end-of-turn ids) and gemma (tied, Gemma4ForCausalLM,
262k vocabulary, <turn|>): vLLM's /tokenize of chat messages must equal HF apply_chat_template,
and the answer must stop at the template's end-of-turn token (finish_reason "stop").

A random tiny model never stops, so the served copy is rewired (`make_stopping_model`): attention
and MLP outputs zeroed, embeddings chosen so that greedy decoding answers one word then emits the
end-of-turn token. It works with tied embeddings too (logits = h . E^T with h parallel to the
current token's embedding), so gemma is served tied, as it ships.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/serve/test_families_serve.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import FAMILY_NAMES, run_cli

from serve.helpers import SERVE_PYTHON, fabricate_merged, free_port, require_serve_env, write_project

REPO = Path(__file__).resolve().parents[2]
SERVED_FAMILIES = ("llama3", "gemma")
EAGER = "serve.extra_args=[--enforce-eager]"


def make_stopping_model(src: Path, out: Path, word: str = "positive") -> tuple[int, int]:
    """Copy the family model `src` to `out`, rewired so that greedy decoding of any prompt gives
    the first token of `word`, then the family's end-of-turn token (generation_config's first
    eos id). Returns (answer id, end-of-turn id).

    Embeddings (tied or not, lm_head = embeddings): every token e0; the answer 1.5 e0 + e1; the
    end-of-turn token 5 (e1 + e2). From any token the answer scores highest (1.5 > 1 > 0); from
    the answer the end-of-turn token does (5 > 3.25 > 1.5). Norms only rescale h (positive).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    answer = tok.encode(word, add_special_tokens=False)[0]
    eos = GenerationConfig.from_pretrained(src).eos_token_id
    eot = eos[0] if isinstance(eos, list) else eos
    zeroed = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(("o_proj", "down_proj")) and isinstance(module, torch.nn.Linear):
                module.weight.zero_()
                zeroed += 1
        emb = model.get_input_embeddings().weight
        emb.zero_()
        emb[:, 0] = 1.0
        emb[answer, 0], emb[answer, 1] = 1.5, 1.0
        emb[eot, 0], emb[eot, 1], emb[eot, 2] = 0.0, 5.0, 5.0
        head = model.get_output_embeddings().weight
        if head.data_ptr() != emb.data_ptr():
            head.copy_(emb)
    assert zeroed == 2 * model.config.get_text_config().num_hidden_layers
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    for extra in ("generation_config.json", "chat_template.jinja", "tokenizer.model"):
        if (src / extra).exists() and not (out / extra).exists():
            shutil.copy(src / extra, out / extra)
    return answer, eot


PREFLIGHT = r"""
import json, sys
from pathlib import Path
from ftpipe.core.errors import InputError
from ftpipe.core.runs import Project
from ftpipe.serve.served import Served
from ftpipe.serve.serve import check_vllm_architecture
root = Path(sys.argv[1])
project = Project(root=root, prepared=root, outputs=root, logs=root)
out = {}
for folder in sys.argv[2:]:
    served = Served("merged", "vllm", folder, "r1", Path(folder), Path(folder))
    try:
        out[Path(folder).name] = {"ok": check_vllm_architecture(served, project)}
    except InputError as exc:
        out[Path(folder).name] = {"refused": exc.message, "hint": exc.hint}
print(json.dumps(out))
"""


@pytest.mark.slow  # imports vLLM (~20 s on a busy CPU)
def test_vllm_preflight_accepts_every_family_and_refuses_unknown(tmp_path, family_model):
    require_serve_env()
    folders = []
    for name in FAMILY_NAMES:
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(family_model(name) / "config.json", folder / "config.json")
        folders.append(folder)
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"architectures": ["NoSuchForCausalLM"]}))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([SERVE_PYTHON, "-c", PREFLIGHT, tmp_path, *folders, unknown], capture_output=True,
                          text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    expected = {"llama3": "LlamaForCausalLM", "qwen2.5": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                "phi3.5": "Phi3ForCausalLM", "mistral": "MistralForCausalLM", "gemma": "Gemma4ForCausalLM"}
    for name, arch in expected.items():
        assert result[name] == {"ok": [arch]}, result[name]
    refused = result["unknown"]["refused"]
    assert refused.startswith("serve: architecture NoSuchForCausalLM") and "not supported by vLLM" in refused
    assert "--artifact gguf" in result["unknown"]["hint"]


@pytest.mark.slow
@pytest.mark.parametrize("name", SERVED_FAMILIES)
def test_serve_and_smoke_test_per_family(name, tmp_path, family_model):
    """A real vLLM server on the family's merged model: prompt tokens equal HF's chat template,
    answers stop at the end-of-turn token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_serve_env()
    model_dir = tmp_path / "model"
    answer, eot = make_stopping_model(family_model(name), model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    word = tok.decode([answer])
    # HF first: the rewired model answers `word` and stops at end-of-turn.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": "Review: a lovely scarf."}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=4, do_sample=False)[0, ids.shape[1]:].tolist()
    assert out == [answer, eot], out

    root = tmp_path / "project"
    root.mkdir()
    port = free_port()
    config = write_project(root, model_dir, port, checks=[
        {"name": "exact", "prompt": "A lovely scarf.", "expect": {"exact": word}},
    ])
    fabricate_merged(root, "r1", model_dir)
    args = ("--config", str(config), "--run", "r1")
    try:
        started = run_cli("serve", *args, "--detach", "--set", EAGER, cwd=root, timeout=1200)
        assert started.code == 0, started.output + (root / "logs/r1/serve/server.log").read_text(errors="replace")[-3000:]
        checked = run_cli("smoke-test", *args, cwd=root, timeout=600)
        results = json.loads((root / "logs/r1/smoke-test/results.json").read_text())
        assert checked.code == 0, checked.output + json.dumps(results)[:2000]
    finally:
        stopped = run_cli("serve", "stop", *args, cwd=root, timeout=300)
    assert stopped.code == 0, stopped.output
    assert results["chat_template"]["checked"] is True and results["chat_template"]["equal"] is True
    assert results["chat_template"]["server_tokens"] == results["chat_template"]["hf_tokens"] > 0
    assert [a["answer"] for a in results["answers"]] == [word] * 3
    assert {a["finish_reason"] for a in results["answers"]} == {"stop"}
    assert [c["passed"] for c in results["prompt_checks"]] == [True]
    assert not (root / "logs/r1/serve/server.json").exists()
