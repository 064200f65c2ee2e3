"""Two `ftpipe finetune-sft` (no --run) started together: separate runs, both complete, and
`latest.txt` is never torn (always one whole run name) while they start."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from tests.training.conftest import ENV, write_project


@pytest.mark.slow
def test_two_finetunes_started_together_get_separate_runs(tmp_path, tiny_model_dir):
    root = write_project(tmp_path / "proj", tiny_model_dir)
    env = {**{k: v for k, v in os.environ.items() if k != "FTPIPE_DEBUG"}, **ENV, "NO_COLOR": "1"}
    cmd = [sys.executable, "-m", "ftpipe", "finetune-sft", "--config", str(root / "config.yaml"),
           "--set", "finetune.max_steps=2", "--set", "finetune.save_steps=2", "--set", "finetune.logging_steps=1"]
    procs = [subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    seen: set[str] = set()
    latest = [root / "outputs/latest.txt", root / "logs/latest.txt"]
    while any(p.poll() is None for p in procs):
        for path in latest:
            if path.is_file():
                seen.add(path.read_text(encoding="utf-8"))
        time.sleep(0.005)
    outputs = [p.communicate() for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, out + err
    runs = sorted(p.name for p in (root / "outputs").iterdir() if p.is_dir())
    assert len(runs) == 2 and runs[0] != runs[1], runs
    for run in runs:
        manifest = json.loads((root / "logs" / run / "finetune-sft/manifest.json").read_text())
        assert manifest["status"] == "completed" and manifest["run"] == run
        assert (root / "outputs" / run / "adapter/adapter_model.safetensors").is_file()
    assert seen, "latest.txt never observed"
    for text in seen:  # every read saw one whole run name, never a torn or empty file
        assert re.fullmatch(r"run-[\w.-]+-\d+\n", text) and text.strip() in runs, repr(text)
