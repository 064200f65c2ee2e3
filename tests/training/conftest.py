"""Fixtures for finetune-sft tests: a project with the demo data prepared by preprocess-sft."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

import tests.project_factory as factory

# Small and fast on a shared 2-core CPU: 8 steps of 2 x 128 packed tokens, on the first 176 demo
# rows (160 train, 16 val: a val set that evaluates in a blink).
SETTINGS = {
    "preprocess": {"limit": 176, "val_fraction": 0.091},
    "finetune": {
        "max_steps": 8, "batch_size": 2, "max_length": 128, "learning_rate": 2.0e-3, "warmup_ratio": 0.0,
        "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "logging_steps": 2, "save_steps": 4, "seed": 7,
    },
}

ENV = {"FTPIPE_ENV": "train"}  # the test interpreter is the train venv: run stages in-process


def write_project(root: Path, model_dir: Path, config: str | dict[str, Any] = "", *, preference: bool = False) -> Path:
    """A project under `root` on `model_dir` with SETTINGS and `config` over them (YAML text or a
    dict, merged key by key), prepared by preprocess-sft (and preprocess-dpo: the demo pairs, with
    `preference`)."""
    return factory.make_project(root, model_dir, factory.merge(SETTINGS, config), preference=preference, prepared=True)


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
