"""Both trainers go through the one training harness (ftpipe/training/harness.py).

finetune-sft and finetune-dpo run on the tiny model (2 steps each) with `harness.run_training` and
`cpu_fastpath.return_freed_memory_to_os` spied on: a trainer that bypassed the harness (its own
loop) would not be recorded, and DPO, which used to skip the memory setting, now gets it too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.training.conftest import write_project


@pytest.fixture
def spied(monkeypatch) -> list[tuple[str, ...]]:
    """Calls of the harness (with the recipe's command) and of the CPU memory setting, in order."""
    from ftpipe.training import cpu_fastpath, harness

    calls: list[tuple[str, ...]] = []
    run_training, freed = harness.run_training, cpu_fastpath.return_freed_memory_to_os

    def spy_run_training(recipe, *args, **kwargs):
        calls.append(("run_training", recipe.command))
        return run_training(recipe, *args, **kwargs)

    def spy_freed():
        calls.append(("return_freed_memory_to_os",))
        return freed()

    monkeypatch.setattr(harness, "run_training", spy_run_training)
    monkeypatch.setattr(cpu_fastpath, "return_freed_memory_to_os", spy_freed)
    return calls


def test_sft_and_dpo_train_through_the_harness(tmp_path: Path, tiny_model_dir: Path, spied) -> None:
    from ftpipe.config import load_config
    from ftpipe.stages import run_stage

    project = write_project(tmp_path, tiny_model_dir, {"dpo": {"max_steps": 2, "batch_size": 2, "max_length": 128,
                                                               "save_steps": 100}}, preference=True)
    loaded = load_config(project / "config.yaml", ["finetune.max_steps=2", "finetune.save_steps=100"])

    sft = run_stage("finetune-sft", loaded, "h")
    assert sft.metrics["global_step"] == 2
    dpo = run_stage("finetune-dpo", loaded, "h")
    assert dpo.metrics["global_step"] == 2 and dpo.metrics["init"] == "sft"

    assert spied == [("run_training", "ftpipe finetune-sft"), ("return_freed_memory_to_os",),
                     ("run_training", "ftpipe finetune-dpo"), ("return_freed_memory_to_os",)]
    # What the harness owns, for both: the atomically published artifact (no temp folder left),
    # the results file and the TensorBoard folder.
    for artifact, state, results in (("adapter", "trainer_state", "ftpipe_train_results.json"),
                                     ("dpo_adapter", "dpo_trainer_state", "ftpipe_dpo_results.json")):
        published = project / "outputs/h" / artifact
        assert {"adapter_model.safetensors", "chat_template.jinja", "ftpipe_base_model.json"} <= \
            {p.name for p in published.iterdir()}
        assert not (published / "training_args.bin").exists()
        assert not list((project / "outputs/h").glob(f".{artifact}.*"))
        assert json.loads((project / "outputs/h" / state / results).read_text())["global_step"] == 2
        assert list((project / "outputs/h" / state / "tensorboard").rglob("events.out.tfevents.*"))


def test_neither_stage_module_imports_the_other() -> None:
    """Shared training code lives in harness.py / sft.py, never in the other stage's command module."""
    import ast

    for module, other in (("finetune_sft", "finetune_dpo"), ("finetune_dpo", "finetune_sft")):
        tree = ast.parse((REPO / f"src/ftpipe/training/{module}.py").read_text(encoding="utf-8"))
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert f"ftpipe.training.{other}" not in imported, module
