"""SIGKILL `ftpipe export-merged` mid-way: the stage is never `completed`, no half-written `merged/`
is taken as output, and a rerun finishes and verifies.

The project is the export tests' fabricated one (a real peft adapter on the tiny Llama behind a
genuine completed finetune-sft manifest, tests/export/conftest.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftpipe.core.errors import InputError
from tests.conftest import run_cli
from tests.export.conftest import fabricate_finetune, make_project


def _manifest(root: Path) -> dict | None:
    path = root / "logs/r1/export-merged/manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


@pytest.mark.slow
def test_sigkill_export_merged_midway_then_rerun(tmp_path, tiny_model_dir):
    root = make_project(tmp_path / "proj", tiny_model_dir)
    fabricate_finetune(root)
    env = {k: v for k, v in os.environ.items() if k != "FTPIPE_DEBUG"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ftpipe", "export-merged", "--config", str(root / "config.yaml"), "--run", "r1"],
        cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    run_dir = root / "outputs/r1"
    deadline = time.monotonic() + 300
    # Kill while the merged model is being written/verified in its temp folder.
    while not any(run_dir.glob(".merged.tmp-*")):
        assert proc.poll() is None, "export-merged finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    manifest = _manifest(root)
    assert manifest is not None and manifest["status"] == "running"  # never `completed`
    assert not (run_dir / "merged").exists()  # nothing half-written under the real name
    from ftpipe.core.config import load_config
    from ftpipe.core.runs import Project, RunDir
    from ftpipe.core.stage import require_completed

    run = RunDir(Project.from_config(load_config(root / "config.yaml")), "r1")
    with pytest.raises(InputError):
        require_completed(run, "export-merged", "ftpipe export-merged")  # downstream refuses it

    again = run_cli("export-merged", "--config", str(root / "config.yaml"), "--run", "r1", cwd=root)
    assert again.code == 0, again.output
    manifest = _manifest(root)
    assert manifest["status"] == "completed"
    assert manifest["metrics"]["max_abs_logit_diff"] < 1e-4
    assert (run_dir / "merged/model.safetensors").is_file()
    assert not any(p.name.startswith(".merged") for p in run_dir.iterdir())  # stale temp cleaned
