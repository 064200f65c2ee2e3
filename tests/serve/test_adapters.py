"""`serve --artifact adapters` without a running model: the SFT and DPO adapters side by side on one
base (vLLM argv, names), and the one-line refusal of adapters vLLM cannot load (DoRA,
modules_to_save) in both adapter modes, before any server starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli

from stage_record import record_stage

from ftpipe.config import load_config
from ftpipe.core.errors import InputError
from ftpipe.core.runs import Project, RunDir, new_run
from ftpipe.core.stage import StageResult
from ftpipe.serve.serve import vllm_command, vllm_lora_rank
from ftpipe.serve.served import resolve_artifact
from ftpipe.stages import producers
from serve.helpers import free_port, write_project

MERGED_HINT = "(next: ftpipe export-merged --run {run}, then ftpipe serve --run {run} --artifact merged)"


@pytest.fixture
def project(tmp_path, tiny_model_dir):
    (tmp_path / "models").mkdir()
    (tmp_path / "models/base").symlink_to(tiny_model_dir, target_is_directory=True)
    return tmp_path, write_project(tmp_path, tiny_model_dir, free_port())


def _adapter(run: RunDir, stage: str, folder_name: str, status: str = "completed", **config) -> None:
    """outputs/<run>/<folder_name> with an adapter_config.json, under a `stage` manifest of `status`."""
    loaded = load_config(run.project.root / "config.yaml", environ={})
    folder = run.path / folder_name

    def body(ctx):
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16, **config}))
        (folder / "ftpipe_base_model.json").write_text(json.dumps({"id": None, "revision": None, "path": "models/base"}))
        if status == "failed":
            raise RuntimeError("interrupted")
        return StageResult(outputs=[folder])

    try:
        record_stage(stage, loaded, run, body)
    except Exception:  # noqa: BLE001 - the failed manifest is what the test wants
        assert status == "failed"


def _run(root, name: str) -> RunDir:
    loaded = load_config(root / "config.yaml", environ={})
    return new_run(Project.from_config(loaded), name)


def test_sft_and_dpo_side_by_side_each_by_name(project):
    root, config = project
    run = _run(root, "r1")
    _adapter(run, "finetune-sft", "adapter", r=16)
    _adapter(run, "finetune-dpo", "dpo_adapter", r=4)
    served = resolve_artifact(run, "adapters", producers=producers())
    assert served.names == ("r1-base", "r1-sft", "r1-dpo")
    assert served.tokenizer_dir == run.adapter and Path(served.model).samefile(root / "models/base")
    argv = vllm_command("python", served, load_config(config, environ={}).config.serve)
    i = argv.index("--served-model-name")
    assert argv[i:] == ["--served-model-name", "r1-base", "--enable-lora", "--max-loras", "2", "--max-lora-rank", "16",
                        "--lora-modules", f"r1-sft={run.adapter}", f"r1-dpo={run.path / 'dpo_adapter'}"]


def test_only_completed_adapters_are_served(project):
    root, _ = project
    run = _run(root, "r2")
    _adapter(run, "finetune-sft", "adapter")
    assert resolve_artifact(run, "adapters", producers=producers()).names == ("r2-base", "r2-sft")  # no finetune-dpo
    _adapter(run, "finetune-dpo", "dpo_adapter", status="failed")
    assert resolve_artifact(run, "adapters", producers=producers()).names == ("r2-base", "r2-sft")  # failed: not served
    # The single-adapter mode keeps its names: the adapter as <run>, the base as <run>-base.
    single = resolve_artifact(run, "adapter", producers=producers())
    assert single.names == ("r2",) and single.loras == (("r2", run.adapter),) and single.baseline == "r2-base"


def test_lora_rank_rounded_up_to_a_vllm_choice():
    assert [vllm_lora_rank(r) for r in (1, 4, 8, 33, 512)] == [1, 8, 8, 64, 512]
    with pytest.raises(InputError, match="LoRA rank 1024 is above vLLM's largest --max-lora-rank 512"):
        vllm_lora_rank(1024)


def test_dora_adapter_refused_in_one_line_pointing_to_merged(project):
    root, config = project
    run = _run(root, "r3")
    _adapter(run, "finetune-sft", "adapter", use_dora=True)
    result = run_cli("serve", "--config", str(config), "--run", "r3", "--artifact", "adapter")
    assert result.code == 2, result.output
    line = ("error: serve: outputs/r3/adapter is a DoRA adapter (use_dora: true), which vLLM cannot serve "
            "(vllm-project/vllm#10849): serve the merged model " + MERGED_HINT.format(run="r3"))
    assert line in result.stderr
    assert [ln for ln in result.stderr.splitlines() if ln.startswith("error:")] == [line]
    assert not (root / "logs/r3/serve/server.log").exists()  # refused before vLLM started


def test_modules_to_save_refused_naming_the_adapter(project):
    root, _ = project
    run = _run(root, "r4")
    _adapter(run, "finetune-sft", "adapter")
    _adapter(run, "finetune-dpo", "dpo_adapter", modules_to_save=["lm_head", "embed_tokens"])
    assert resolve_artifact(run, "adapter", producers=producers()).names == ("r4",)  # the SFT adapter alone is servable
    with pytest.raises(InputError) as caught:
        resolve_artifact(run, "adapters", producers=producers())
    assert caught.value.message == ("serve: outputs/r4/dpo_adapter has modules_to_save (lm_head, embed_tokens), which "
                                    "vLLM cannot serve (vllm-project/vllm#9280): serve the merged model")
    assert caught.value.hint == "ftpipe export-merged --run r4, then ftpipe serve --run r4 --artifact merged"
    # Both problems at once, in one line.
    _adapter(_run(root, "r5"), "finetune-sft", "adapter", use_dora=True, modules_to_save=["lm_head"])
    with pytest.raises(InputError, match=r"DoRA adapter .*; serve: outputs/r5/adapter has modules_to_save \(lm_head\)"):
        resolve_artifact(RunDir(run.project, "r5"), "adapters", producers=producers())
