"""Checkpoint completeness checks and --resume-from resolution (no training: files built here)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from ftpipe.core.errors import InputError
from ftpipe.training.checkpoints import checkpoint_problems, latest_complete_checkpoint, resolve_resume


def make_checkpoint(folder: Path, step: int) -> Path:
    import torch
    from safetensors.torch import save_file

    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    save_file({"lora_A": torch.zeros(4, 8), "lora_B": torch.ones(8, 4)}, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text("{}")
    torch.save({"state": {0: torch.zeros(10)}}, path / "optimizer.pt")
    torch.save({"last_epoch": step}, path / "scheduler.pt")
    torch.save({"cpu": torch.random.get_rng_state()}, path / "rng_state.pth")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    return path


def test_complete_checkpoint_has_no_problems(tmp_path):
    assert checkpoint_problems(make_checkpoint(tmp_path, 4)) == []


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("truncate:adapter_model.safetensors", "adapter_model.safetensors: "),
        ("truncate:optimizer.pt", "optimizer.pt: not a complete torch file (BadZipFile)"),
        ("delete:scheduler.pt", "scheduler.pt: missing"),
        ("delete:rng_state.pth", "rng_state.pth: missing"),
        ("truncate:trainer_state.json", "trainer_state.json: invalid JSON (JSONDecodeError)"),
        ("delete:adapter_model.safetensors", "weights: missing"),
    ],
)
def test_damaged_checkpoints_are_reported(tmp_path, damage, expected):
    path = make_checkpoint(tmp_path, 4)
    action, name = damage.split(":")
    target = path / name
    if action == "delete":
        target.unlink()
    else:
        target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])
    problems = checkpoint_problems(path)
    assert any(p.startswith(expected) for p in problems), problems


def test_latest_skips_incomplete_newer_checkpoint(tmp_path, caplog):
    make_checkpoint(tmp_path, 4)
    newer = make_checkpoint(tmp_path, 8)
    (newer / "optimizer.pt").write_bytes(b"PK\x03\x04 cut short")
    with caplog.at_level(logging.WARNING):
        assert latest_complete_checkpoint(tmp_path).name == "checkpoint-4"
    assert "skipping incomplete checkpoint" in caplog.text and "checkpoint-8" in caplog.text


def test_resume_options(tmp_path):
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("auto", tmp_path) is None
    with pytest.raises(InputError, match="--resume-from latest: no complete checkpoint"):
        resolve_resume("latest", tmp_path)
    make_checkpoint(tmp_path, 4)
    broken = make_checkpoint(tmp_path, 8)
    (broken / "scheduler.pt").unlink()
    assert resolve_resume("latest", tmp_path).name == "checkpoint-4"
    assert resolve_resume("checkpoint-4", tmp_path).name == "checkpoint-4"
    with pytest.raises(InputError, match=r"--resume-from checkpoint-8: incomplete checkpoint \(scheduler.pt: missing\)"):
        resolve_resume("checkpoint-8", tmp_path)
