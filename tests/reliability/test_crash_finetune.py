"""SIGKILL a fine-tune at 10 seeded random moments, resuming after each: the run reaches the same
final step as an uninterrupted one, with an unbroken loss history identical to it.

Extends tests/training/test_resume.py (one kill) with repeated kills over the whole run: during
start-up, after random checkpoints (the random delay may land while the next checkpoint is being
written), and after the last checkpoint while the stage evaluates and publishes the adapter.
Tiny model, 10 steps, a checkpoint and a logged loss every step (so every resume point is a
logging boundary and the logged losses compare one to one).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftpipe.training.checkpoints import checkpoint_problems, checkpoint_step, latest_complete_checkpoint
from tests.conftest import run_cli
from tests.training.conftest import ENV, log_history, write_project

MAX_STEPS = 10
STEPS = ("--set", f"finetune.max_steps={MAX_STEPS}", "--set", "finetune.save_steps=1",
         "--set", "finetune.logging_steps=1")
CLI_ENV = {**{k: v for k, v in os.environ.items() if k != "FTPIPE_DEBUG"}, **ENV, "NO_COLOR": "1"}
KILLS = 10
# Start-up moments after the stage began, observed in this session's run.log.
STARTUP_MARKERS = ("finetune-sft: started", "plan: packing", "trainable parameters")  # before any step


def _losses(history):
    return [(h["step"], h["loss"]) for h in history if "loss" in h]


def _moments(rnd: random.Random) -> list[tuple[str | None, int]]:
    """(start-up marker, 0) or (None, k): a kill after checkpoint-k. Two start-up kills: the first
    session during its imports ("launch"), a resumed session at a random start-up log line; then
    7 after random checkpoints and one after the last."""
    middle = [(None, k) for k in sorted(rnd.sample(range(1, MAX_STEPS), KILLS - 3))]
    cut = rnd.randint(1, len(middle))
    return [("launch", 0), *middle[:cut], (rnd.choice(STARTUP_MARKERS), 0), *middle[cut:], (None, MAX_STEPS)]


def _complete(path: Path) -> bool:
    return path.is_dir() and not checkpoint_problems(path)


def _wait(predicate, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 300
    while not predicate() and proc.poll() is None:
        assert time.monotonic() < deadline, f"{what} never happened"
        time.sleep(0.01)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_each_time(tmp_path, tiny_model_dir):
    # A larger validation set (all 800 demo rows prepared, 624 of them val): the final evaluation,
    # between the last checkpoint and the published adapter, then lasts long enough (about a
    # second) to be killed in.
    root = write_project(tmp_path / "proj", tiny_model_dir, {"preprocess": {"limit": None, "val_fraction": 0.78}})
    config = str(root / "config.yaml")
    straight = run_cli("finetune-sft", "--config", config, "--run", "straight", *STEPS, cwd=root, env=ENV)
    assert straight.code == 0, straight.output
    expected = _losses(log_history(root / "outputs/straight"))
    assert [s for s, _ in expected] == list(range(1, MAX_STEPS + 1))

    rnd = random.Random(10)
    state = root / "outputs/killed/trainer_state"
    run_log = root / "logs/killed/finetune-sft/run.log"
    manifest_path = root / "logs/killed/finetune-sft/manifest.json"
    killed: list[str] = []
    for marker, target in _moments(rnd):
        latest = latest_complete_checkpoint(state)
        resumed_at = checkpoint_step(latest) if latest else 0
        log_start = run_log.stat().st_size if run_log.is_file() else 0

        def logged(text: str) -> bool:
            if not run_log.is_file():
                return False
            with open(run_log, encoding="utf-8", errors="replace") as fh:
                fh.seek(log_start)
                return text in fh.read()  # this session's lines only

        # `auto`: the newest complete checkpoint, or a fresh start when a kill came before the first one.
        proc = subprocess.Popen(
            [sys.executable, "-m", "ftpipe", "finetune-sft", "--config", config, "--run", "killed", *STEPS,
             "--resume-from", "auto"],
            cwd=root, env=CLI_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )
        if marker == "launch":
            event, delay = "launch", rnd.uniform(0.0, 2.0)  # Python, torch, transformers imports
        elif marker is not None:
            event, delay = repr(marker), rnd.uniform(0.0, 0.2)
            _wait(lambda: logged(marker), proc, marker)
        else:
            # A checkpoint this session writes: never one that was already there when it started.
            ckpt = state / f"checkpoint-{min(max(target, resumed_at + 1), MAX_STEPS)}"
            # Within the next step (often mid-write of the next checkpoint) or, after the last
            # one, while the stage evaluates and saves the adapter.
            event, delay = ckpt.name, rnd.uniform(0.0, 0.15 if target < MAX_STEPS else 0.1)
            _wait(lambda: _complete(ckpt), proc, ckpt.name)
        time.sleep(delay)
        moment = f"{event} + {delay:.2f}s"
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole session (no child survives)
        _, err = proc.communicate()
        assert proc.returncode == -signal.SIGKILL, (  # the kill came before the run could finish
            f"{moment}: exit {proc.returncode} {err.decode(errors='replace')[-2000:]}")
        killed.append(moment)
        if manifest_path.is_file():  # absent only when killed before the stage began
            assert json.loads(manifest_path.read_text())["status"] == "running", moment  # never `completed`
    assert len(killed) == KILLS

    final = run_cli("finetune-sft", "--config", config, "--run", "killed", *STEPS, "--resume-from", "auto",
                    cwd=root, env=ENV)
    assert final.code == 0, final.output
    manifest = json.loads(manifest_path.read_text())
    assert manifest["status"] == "completed" and manifest["metrics"]["global_step"] == MAX_STEPS, killed
    # The last kill came after checkpoint-10: it is published as is, with no 11th step.
    assert f"checkpoint-{MAX_STEPS} is already at the last step" in run_log.read_text()
    assert not (state / f"checkpoint-{MAX_STEPS + 1}").exists()
    got = _losses(log_history(root / "outputs/killed"))
    assert [s for s, _ in got] == [s for s, _ in expected], killed  # unbroken: every step once, in order
    for (step, a), (_, b) in zip(got, expected):
        assert a == pytest.approx(b, rel=1e-5), (step, killed)
