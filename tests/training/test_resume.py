"""Never lose work: SIGKILL + resume gives the same losses, truncated checkpoints are skipped,
Ctrl-C saves a checkpoint (several processes: test_scale_out.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftpipe.training.checkpoints import checkpoint_problems
from tests.conftest import run_cli
from tests.training.conftest import ENV, log_history, logged_loss

CLI_ENV = {**os.environ, **ENV, "COLUMNS": "200", "NO_COLOR": "1"}


def _start(project: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ftpipe", "finetune-sft", "--config", str(project / "config.yaml"), *args],
        cwd=project, env=CLI_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"training exited ({proc.returncode}) before the condition: {out}{err}")
        time.sleep(0.02)  # 8 steps take ~0.5 s here: a slow poll can miss the moment before the run ends
    proc.kill()
    pytest.fail("timed out")


@pytest.fixture(scope="module")
def uninterrupted(ft_project):
    result = run_cli("finetune-sft", "--config", str(ft_project / "config.yaml"), "--run", "straight", cwd=ft_project, env=ENV)
    assert result.code == 0, result.output
    return log_history(ft_project / "outputs/straight")


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(ft_project, uninterrupted):
    state = ft_project / "outputs/killed/trainer_state"
    proc = _start(ft_project, "--run", "killed")
    _wait_for(lambda: (state / "checkpoint-4").is_dir() and not checkpoint_problems(state / "checkpoint-4"), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    manifest = json.loads((ft_project / "logs/killed/finetune-sft/manifest.json").read_text())
    assert manifest["status"] == "running"  # a hard kill never leaves `completed`

    # A newer, deliberately truncated checkpoint must be skipped with a warning.
    for stale in state.glob("checkpoint-*"):
        if stale.name != "checkpoint-4":
            shutil.rmtree(stale)
    broken = state / "checkpoint-6"
    shutil.copytree(state / "checkpoint-4", broken)
    trainer_state = json.loads((broken / "trainer_state.json").read_text())
    trainer_state["global_step"] = 6
    (broken / "trainer_state.json").write_text(json.dumps(trainer_state))
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert checkpoint_problems(broken) and "truncated" in checkpoint_problems(broken)[0]

    # Without --resume-from, the unfinished run's checkpoints are not thrown away.
    refused = run_cli("finetune-sft", "--config", str(ft_project / "config.yaml"), "--run", "killed",
                      cwd=ft_project, env=ENV)
    assert refused.code == 2
    assert "run killed has checkpoints from an unfinished training" in refused.stderr
    assert "(next: ftpipe finetune-sft --run killed --resume-from latest (or --force to start over))" in refused.stderr

    resumed = run_cli("finetune-sft", "--config", str(ft_project / "config.yaml"), "--run", "killed",
                      "--resume-from", "latest", cwd=ft_project, env=ENV)
    assert resumed.code == 0, resumed.output
    run_log = (ft_project / "logs/killed/finetune-sft/run.log").read_text()
    assert "WARNING ftpipe.training.checkpoints: skipping incomplete checkpoint outputs/killed/trainer_state/checkpoint-6: adapter_model.safetensors: " in run_log
    manifest = json.loads((ft_project / "logs/killed/finetune-sft/manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert manifest["metrics"]["resumed_from"] == "checkpoint-4"
    history = log_history(ft_project / "outputs/killed")
    # Next logging step after the checkpoint, and the end: same loss as without the kill.
    for step in (6, 8):
        assert logged_loss(history, step) == pytest.approx(logged_loss(uninterrupted, step), rel=1e-5)


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_130(ft_project):
    state = ft_project / "outputs/ctrlc/trainer_state"
    run_log = ft_project / "logs/ctrlc/finetune-sft/run.log"
    # Long enough that Ctrl-C lands mid-run: 8 steps now take half a second once training starts.
    proc = _start(ft_project, "--run", "ctrlc", "--set", "finetune.save_steps=100000",
                  "--set", "finetune.max_steps=2000")
    _wait_for(lambda: run_log.is_file() and "step 2/2000 loss" in run_log.read_text(), proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, out + err
    saved = sorted(state.glob("checkpoint-*"))
    assert len(saved) == 1 and not checkpoint_problems(saved[0])
    assert "training stopped at step" in err
    assert "(next: ftpipe finetune-sft --run ctrlc --resume-from latest)" in err


@pytest.mark.slow
def test_resume_from_the_last_checkpoint_trains_no_extra_step(ft_project, uninterrupted):
    """Killed after checkpoint-<max_steps> but before the stage completed (e.g. while evaluating or
    saving the adapter), then resumed: that checkpoint is published as is, no 9th step is trained."""
    straight, late = ft_project / "outputs/straight", ft_project / "outputs/late"
    # The state such a kill leaves: every checkpoint written, no adapter, the manifest `running`.
    shutil.copytree(straight / "trainer_state", late / "trainer_state")
    (late / "trainer_state/ftpipe_train_results.json").unlink()
    straight_manifest = json.loads((ft_project / "logs/straight/finetune-sft/manifest.json").read_text())
    (ft_project / "logs/late/finetune-sft").mkdir(parents=True)
    (ft_project / "logs/late/finetune-sft/manifest.json").write_text(json.dumps({**straight_manifest, "status": "running"}))
    checkpoints = sorted(p.name for p in (late / "trainer_state").glob("checkpoint-*"))
    assert "checkpoint-8" in checkpoints

    resumed = run_cli("finetune-sft", "--config", str(ft_project / "config.yaml"), "--run", "late",
                      "--resume-from", "latest", cwd=ft_project, env=ENV)
    assert resumed.code == 0, resumed.output
    manifest = json.loads((ft_project / "logs/late/finetune-sft/manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert manifest["metrics"]["global_step"] == 8 and manifest["metrics"]["resumed_from"] == "checkpoint-8"
    for key in ("first_logged_loss", "last_logged_loss", "train_loss", "eval_loss"):
        assert manifest["metrics"][key] == pytest.approx(straight_manifest["metrics"][key], rel=1e-5), key
    assert sorted(p.name for p in (late / "trainer_state").glob("checkpoint-*")) == checkpoints  # no checkpoint-9
    assert log_history(late) == uninterrupted

    from safetensors.torch import load_file

    got = load_file(late / "adapter/adapter_model.safetensors")
    want = load_file(straight / "adapter/adapter_model.safetensors")
    assert got.keys() == want.keys() and all(got[k].equal(want[k]) for k in want)
    assert "checkpoint-8 is already at the last step (8/8): publishing it without training" in \
        (ft_project / "logs/late/finetune-sft/run.log").read_text()
