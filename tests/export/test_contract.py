"""The export stages' checks that run on the host before delegating (convert-awq, export-gguf) import
nothing of the environment they delegate to, even when run inside it. (The contract's shape, for
every stage: tests/core/test_stage_contract.py.)

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/export/test_contract.py
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.export.conftest import REPO, make_project

CHECK_IN_ENV = r"""
import json, sys
from pathlib import Path
from ftpipe import stages
from ftpipe.config import load_config

stage = stages.get(sys.argv[2])
ctx, inputs = stages.prepare(stage, load_config(Path(sys.argv[1])), "r1")
print(json.dumps({"inputs": sorted(inputs), "loaded": sorted(m for m in ("llmcompressor", "llama_cpp") if m in sys.modules)}))
"""


@pytest.mark.parametrize("stage, env, inputs", [
    ("convert-awq", "awq", ["merged", "train", "val"]),
    ("export-gguf", "gguf", ["export-merged"]),
])
def test_check_imports_nothing_of_the_stage_environment(tmp_path, tiny_model_dir, stage, env, inputs):
    """`check` inside the awq / gguf venv (where it runs again after the host pre-flight) passes on a
    completed export-merged without importing llm-compressor or llama_cpp."""
    from stage_record import record_stage

    from ftpipe.config import load_config
    from ftpipe.core.runs import Project, new_run
    from ftpipe.core.stage import StageResult

    root = make_project(tmp_path / "p", tiny_model_dir)
    loaded = load_config(root / "config.yaml")
    run = new_run(Project.from_config(loaded), "r1")

    def merged(ctx):
        shutil.copytree(tiny_model_dir, run.merged)
        return StageResult(outputs=[run.merged])

    record_stage("export-merged", loaded, run, merged)
    python = REPO / f".venv-{env}/bin/python"
    proc = subprocess.run(
        [str(python), "-c", CHECK_IN_ENV, str(root / "config.yaml"), stage], cwd=root, capture_output=True,
        text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "FTPIPE_ENV": env, "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"inputs": inputs, "loaded": []}
