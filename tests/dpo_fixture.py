"""Session fixtures of the SFT -> DPO tests, shared by tests/eval and tests/serve (registered in
tests/conftest.py, so one pytest session builds each once).

`tuned_project`: run r1 with 200 real TRL SFT steps on the tiny Llama, then merged.
`sft_dpo_project`: a copy of it with preference pairs and a real DPO adapter (20 DPOTrainer steps
from the SFT adapter). Both are read-only for tests: a test that runs a stage on one (eval-sft,
serve, smoke-test, report) works on its own copy, `copy_project(...)`.
The helpers that build them live in tests/eval/conftest.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


def copy_project(src: Path, dest: Path) -> Path:
    """A copy of a fixture's project (the .venv link kept as a link) for a test that writes to it."""
    shutil.copytree(src, dest, symlinks=True)
    return dest


@pytest.fixture(scope="session")
def tuned_project(tmp_path_factory, tiny_model_dir) -> Path:
    """Project with run r1: 200 real LoRA steps on the sentiment data (~35 s), then merged."""
    from tests.eval.conftest import fine_tune, make_project, merge

    root = make_project(tmp_path_factory.mktemp("eval-proj"), tiny_model_dir)
    fine_tune(root)
    merge(root)
    return root


@pytest.fixture(scope="session")
def sft_dpo_project(tuned_project, tmp_path_factory) -> Path:
    """A copy of `tuned_project` with preference pairs and a real DPO adapter (20 DPO steps from the SFT adapter)."""
    from tests.eval.conftest import dpo_tune, write_pairs

    root = copy_project(tuned_project, tmp_path_factory.mktemp("dpo-proj") / "proj")
    write_pairs(root)
    dpo_tune(root)
    return root
