"""SIGKILL a fine-tune at seeded random moments (after checkpoints 2 and 4), resuming after each: the run reaches
the same final step as an uninterrupted one with an unbroken, identical loss history.

Extends tests/training/test_resume.py (one kill) with repeated kills; tiny model, 8 steps,
a checkpoint every 2 steps.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from ftpipe.training.checkpoints import checkpoint_problems
from tests.conftest import run_cli
from tests.training.conftest import ENV, log_history, write_project

STEPS = ("--set", "finetune.save_steps=2")
CLI_ENV = {**{k: v for k, v in os.environ.items() if k != "FTPIPE_DEBUG"}, **ENV, "NO_COLOR": "1"}


def _losses(history):
    return [(h["step"], h["loss"]) for h in history if "loss" in h]


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_each_time(tmp_path, tiny_model_dir):
    root = write_project(tmp_path / "proj", tiny_model_dir)
    config = str(root / "config.yaml")
    straight = run_cli("finetune-sft", "--config", config, "--run", "straight", *STEPS, cwd=root, env=ENV)
    assert straight.code == 0, straight.output
    expected = _losses(log_history(root / "outputs/straight"))
    assert [s for s, _ in expected] == [2, 4, 6, 8]

    rnd = random.Random(10)
    state = root / "outputs/killed/trainer_state"
    resume: tuple[str, ...] = ()
    kills = 0
    # Kill after checkpoints 2 and 4 (a random moment up to 0.3 s later), never after the last
    # one: a kill between checkpoint-8 and the stage's end, resumed, trains a 9th step (known bug,
    # see docs/reliability.md).
    for target in (2, 4):
        proc = subprocess.Popen(
            [sys.executable, "-m", "ftpipe", "finetune-sft", "--config", config, "--run", "killed", *STEPS, *resume],
            cwd=root, env=CLI_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        ckpt = state / f"checkpoint-{target}"
        deadline = time.monotonic() + 300
        while not (ckpt.is_dir() and not checkpoint_problems(ckpt)) and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(rnd.uniform(0.0, 0.3))  # a random moment after that checkpoint
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        manifest = json.loads((root / "logs/killed/finetune-sft/manifest.json").read_text())
        if proc.returncode == -signal.SIGKILL:
            assert manifest["status"] == "running"
        resume = ("--resume-from", "latest")
    assert kills >= 2
    final = run_cli("finetune-sft", "--config", config, "--run", "killed", *STEPS, "--resume-from", "latest",
                    cwd=root, env=ENV)
    assert final.code == 0, final.output
    manifest = json.loads((root / "logs/killed/finetune-sft/manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["metrics"]["global_step"] == 8
    got = _losses(log_history(root / "outputs/killed"))
    assert [s for s, _ in got] == [2, 4, 6, 8]  # unbroken: every logging step once, in order
    for (_, a), (_, b) in zip(got, expected):
        assert a == pytest.approx(b, rel=1e-5)
