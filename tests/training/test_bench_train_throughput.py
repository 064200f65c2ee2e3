"""bench/train_throughput.py: its summary (ftpipe against the strongest baseline) and a run on a 1-layer model."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from argparse import Namespace

import pytest

from conftest import REPO


def _bench():
    spec = importlib.util.spec_from_file_location("train_throughput", REPO / "bench/train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _result(tokens_per_s: float, rss: float, precision: str = "fp32") -> dict:
    return {"tokens_per_s": tokens_per_s, "peak_rss_mb": rss, "lora_params": 10, "setup": {"precision": precision}}


def test_summary_compares_each_trainers_fastest_round_with_the_strongest_baseline():
    bench = _bench()
    rounds = [
        {"ftpipe": _result(100, 1000), "trl-cpu": _result(40, 3000), "trl-cpu-bf16": _result(30, 2000, "bf16"),
         "trl": _result(10, 2500, "bf16")},
        {"trl": _result(12, 2600, "bf16"), "trl-cpu-bf16": _result(35, 2100, "bf16"), "trl-cpu": _result(50, 3100),
         "ftpipe": _result(90, 900)},
    ]
    args = Namespace(threads=2, steps=4, batch_size=4, seq=256, vocab=151936, layers=30)
    summary, lines = bench.summarize(rounds, {"float32": 100.0, "bfloat16": 20.0}, 1e9, args)
    assert summary["strongest_baseline"] == "trl-cpu"
    assert summary["ftpipe"]["tokens_per_s"] == 100 and summary["trl_cpu"]["tokens_per_s"] == 50
    assert summary["speedup_vs_strongest"] == pytest.approx(2.0) == summary["speedup_vs_trl_cpu"]
    assert summary["rss_ratio_vs_strongest"] == pytest.approx(1000 / 3100)
    assert summary["speedup_vs_trl"] == pytest.approx(100 / 12)
    assert summary["fraction_of_peak"] == pytest.approx(1.0)  # 100 tok/s x 1 GFLOP at a 100 GFLOP/s fp32 peak
    text = "\n".join(lines)
    assert "ftpipe vs TRL tuned for the CPU (strongest baseline): 2.00x tokens/s, 0.32x peak RSS" in text
    assert "ftpipe vs TRL defaults: 8.33x tokens/s" in text and "ftpipe vs TRL tuned, bf16: 2.86x tokens/s" in text
    assert ("summary vs the strongest baseline (TRL tuned for the CPU): tokens/s 2.00x (target >= 2.0x), "
            "peak RSS 0.32x (target <= 0.5x)") in text


@pytest.mark.slow
def test_bench_runs_all_trainers_in_alternating_rounds(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench/train_throughput.py"), "--layers", "1", "--vocab", "8192", "--steps", "4",
         "--batch-size", "1", "--seq", "64", "--rounds", "2", "--threads", "1", "--baselines", "trl-cpu", "trl",
         "--json", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    starts = re.findall(r"round (\d): (ftpipe|TRL tuned for the CPU|TRL defaults) \(4 steps\)", text)
    assert starts == [("1", "ftpipe"), ("1", "TRL tuned for the CPU"), ("1", "TRL defaults"),
                      ("2", "TRL defaults"), ("2", "TRL tuned for the CPU"), ("2", "ftpipe")]
    assert re.search(r"round 2: ftpipe tokens/s = [0-9.]+x TRL tuned for the CPU, [0-9.]+x TRL defaults", text), text
    assert re.search(r"summary vs the strongest baseline \(TRL (tuned for the CPU|defaults)\): tokens/s [0-9.]+x "
                     r"\(target >= 2.0x\), peak RSS [0-9.]+x \(target <= 0.5x\)", text), text
    summary = json.loads(out.read_text())
    assert summary["vocab"] == 8192 and len(summary["rounds"]) == 2 and "trl_cpu_bf16" not in summary
    assert summary["trl_cpu"]["setup"] == {"precision": "fp32", "gradient_checkpointing": False, "packing": True}
    assert summary["trl"]["setup"]["gradient_checkpointing"] is True
