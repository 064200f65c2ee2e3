"""The export stages follow the stage contract (ftpipe/core/stage.py): check(ctx), plan(ctx) -> a frozen
<Stage>Plan, run(ctx, plan); and the checks that run on the host before delegating (convert-awq,
export-gguf) import nothing of the environment they delegate to, even when run inside it.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/export/test_contract.py
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import shutil
import subprocess
import typing

import pytest

from tests.export.conftest import REPO, make_project

STAGES = {
    "ftpipe.export.export_merged": "ExportMergedPlan",
    "ftpipe.export.convert_awq": "ConvertAwqPlan",
    "ftpipe.export.export_gguf": "ExportGgufPlan",
    "ftpipe.export.ollama_load": "OllamaLoadPlan",
}


@pytest.mark.parametrize("name, plan_name", STAGES.items())
def test_check_plan_run(name, plan_name):
    module = importlib.import_module(name)
    assert not hasattr(module, "prepare")
    plan_type = typing.get_type_hints(module.plan)["return"]
    assert plan_type.__name__ == plan_name and plan_type.__module__ == name
    assert dataclasses.is_dataclass(plan_type) and plan_type.__dataclass_params__.frozen
    hints = typing.get_type_hints(plan_type)
    assert [f.name for f in dataclasses.fields(plan_type)] == list(hints)
    assert typing.get_type_hints(module.run)["plan"] is plan_type
    assert set(typing.get_type_hints(module.check)) == {"ctx", "return"}


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
