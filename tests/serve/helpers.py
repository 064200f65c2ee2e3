"""Helpers for the serve tests: a tiny model that answers a fixed word and then stops at EOS, a
project (tests/project_factory.py) whose run holds it as a completed `export-merged` output, and a
free loopback port.

A random-init tiny model never emits EOS, so a smoke test of "answers stop at EOS" would always
fail on it. `make_answering_model` turns the tiny untied Qwen2 into a deterministic bigram model:
attention and MLP outputs are zeroed (the last hidden state is the current token's embedding), and
the embeddings / lm_head chain every prompt token -> the answer's tokens -> <|im_end|>.
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SERVE_PYTHON = REPO / ".venv-serve" / "bin" / "python"
ANSWER = "positive"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_answering_model(src: Path, out: Path, answer: str = ANSWER) -> list[int]:
    """Copy the untied tiny model `src` to `out`, rewired to answer `answer` then EOS (greedy).

    Returns:
        The answer's token ids.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    assert not model.config.tie_word_embeddings, "needs an untied model (tiny_qwen_dir)"
    ids = tok.encode(answer, add_special_tokens=False)
    assert len(set(ids)) == len(ids) and len(ids) + 1 < model.config.hidden_size
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        head = model.lm_head.weight
        emb.zero_()
        head.zero_()
        emb[:, 0] = 1.0  # every token: direction 0 ...
        for k, t in enumerate(ids, start=1):  # ... except the answer's k-th token: direction k
            emb[t, 0] = 0.0
            emb[t, k] = 1.0
        head[ids[0], 0] = 4.0  # any token -> first answer token
        for k in range(1, len(ids)):
            head[ids[k], k] = 4.0  # answer token k -> k+1
        head[eos, len(ids)] = 4.0  # last answer token -> EOS
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    for extra in ("generation_config.json", "chat_template.jinja"):
        if (src / extra).exists() and not (out / extra).exists():
            shutil.copy(src / extra, out / extra)
    return ids


def fabricate_merged(project_dir: Path, run_name: str, model_dir: Path) -> None:
    """outputs/<run>/merged = `model_dir`, with a completed export-merged manifest (`record_stage`)."""
    from stage_record import record_stage

    from ftpipe.config import load_config
    from ftpipe.core.runs import Project, new_run
    from ftpipe.core.stage import StageResult

    loaded = load_config(project_dir / "config.yaml", environ={})
    run = new_run(Project.from_config(loaded), run_name)

    def body(ctx):
        shutil.copytree(model_dir, run.merged, dirs_exist_ok=True)
        (run.merged / "ftpipe_base_model.json").write_text(json.dumps({"id": None, "revision": None, "path": "models/base"}))
        return StageResult(outputs=[run.merged], summary="fabricated for the serve tests")

    result = record_stage("export-merged", loaded, run, body)
    assert result.manifest["status"] == "completed"


def write_project(root: Path, base_model: Path, port: int, checks: list[dict] | None = None,
                  config: str | dict | None = None) -> Path:
    """A project on `base_model` serving on `port`: the demo data prepared by preprocess-sft (the
    smoke test's prompts are its val split), a prompt-checks file, serve and smoke-test settings
    (`config` over them); returns the config path."""
    from tests.project_factory import make_project, merge

    checks = checks if checks is not None else [
        {"name": "exact", "system": "Label it.", "prompt": "A lovely scarf.", "expect": {"exact": ANSWER}},
        {"name": "contains", "prompt": "Anything at all?", "expect": {"contains": "posit"}},
        {"name": "regex", "prompt": "Say something.", "expect": {"regex": "^pos.*ve$"}},
    ]
    settings = {
        "eval": {"prompts_file": "checks.json"},
        "serve": {"port": port, "startup_timeout": 900, "max_model_len": 256},
        "smoke_test": {"prompts": 3, "max_tokens": 16, "timeout": 120},
    }
    root = make_project(root, base_model, merge(settings, config or {}), prepared=True,
                        files={"checks.json": json.dumps({"checks": checks})})
    return root / "config.yaml"


def require_serve_env() -> None:
    """The serve environment is part of CI (scripts/test.sh bootstraps it): missing = failure."""
    assert SERVE_PYTHON.exists(), "the serve environment is missing: bash scripts/bootstrap.sh serve"
