"""Fixtures for finetune-sft tests: a project with a prepared dataset (written here, not by preprocess-sft)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from tests.conftest import REPO

# Small and fast on a shared 2-core CPU: 8 steps of 2 x 128 packed tokens.
FINETUNE_YAML = """\
finetune:
  max_steps: 8
  batch_size: 2
  max_length: 128
  learning_rate: 2.0e-3
  warmup_ratio: 0.0
  lora_r: 16
  lora_alpha: 32
  lora_dropout: 0.0
  logging_steps: 2
  save_steps: 4
  seed: 7
"""

ENV = {"FTPIPE_ENV": "train"}  # the test interpreter is the train venv: run stages in-process


def write_project(root: Path, model_dir: Path, extra_yaml: str = "") -> Path:
    """config.yaml + prepared/sentiment/{train,val}.jsonl (messages rows) under `root`."""
    rows = (REPO / "data/demo/sentiment.jsonl").read_text(encoding="utf-8").splitlines()
    prepared = root / "prepared" / "sentiment"
    prepared.mkdir(parents=True, exist_ok=True)
    for row in rows[:40]:
        assert json.loads(row)["messages"]
    (prepared / "train.jsonl").write_text("\n".join(rows[:160]) + "\n", encoding="utf-8")
    (prepared / "val.jsonl").write_text("\n".join(rows[160:176]) + "\n", encoding="utf-8")
    (root / "config.yaml").write_text(
        f"model:\n  path: {model_dir}\ndata:\n  name: sentiment\n" + FINETUNE_YAML + extra_yaml, encoding="utf-8"
    )
    return root


@pytest.fixture(scope="module")
def ft_project(tmp_path_factory, tiny_model_dir) -> Path:
    """A project shared by the tests of one module."""
    return write_project(tmp_path_factory.mktemp("ftproj"), tiny_model_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_history(run_dir: Path) -> list[dict]:
    """log_history of the newest checkpoint's trainer_state.json."""
    checkpoints = sorted((run_dir / "trainer_state").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return json.loads((checkpoints[-1] / "trainer_state.json").read_text())["log_history"]


def logged_loss(history: list[dict], step: int) -> float:
    return next(h["loss"] for h in history if h.get("step") == step and "loss" in h)
