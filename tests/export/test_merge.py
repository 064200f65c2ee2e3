"""export-merged on tiny Llama (tied embeddings) and Qwen2 (untied): logits, files, EOS, idempotence."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli


def _merge(root, *extra):
    return run_cli("export-merged", "--config", str(root / "config.yaml"), "--run", "r1", *extra, cwd=root)


def _check_merged(root, tied: bool):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = root / "outputs/r1/merged"
    names = {p.name for p in merged.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja", "ftpipe_base_model.json"} <= names
    assert not any(p.name.startswith(".merged") for p in merged.parent.iterdir())  # no temp left
    manifest = json.loads((root / "logs/r1/export-merged/manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert manifest["metrics"]["max_abs_logit_diff"] < 1e-4
    assert manifest["metrics"]["verify_source"] == "prepared/sentiment/val.jsonl"
    assert manifest["metrics"]["tied_embeddings"] is tied
    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    assert "<|im_start|>" in tok.chat_template and "generation" in tok.chat_template
    assert tok.eos_token == "<|im_end|>"
    eos = model.generation_config.eos_token_id
    assert tok.eos_token_id in (eos if isinstance(eos, list) else [eos])
    if tied:
        assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    return manifest


@pytest.mark.slow
def test_merge_tied_llama_and_idempotent(llama_run):
    result = _merge(llama_run)
    assert result.code == 0, result.output
    first = _check_merged(llama_run, tied=True)
    again = _merge(llama_run)
    assert again.code == 0, again.output
    assert "up to date, skipped" in again.output
    assert json.loads((llama_run / "logs/r1/export-merged/manifest.json").read_text())["finished_at"] == first["finished_at"]


@pytest.mark.slow
def test_merge_untied_qwen2_in_process(qwen_run):
    from ftpipe.config import load_config
    from ftpipe.stages import run_stage

    result = run_stage("export-merged", load_config(qwen_run / "config.yaml"), "r1")
    assert not result.skipped
    _check_merged(qwen_run, tied=False)


def test_merge_without_finetune_exits_2(tmp_path, tiny_model_dir):
    from tests.export.conftest import make_project

    root = make_project(tmp_path / "p", tiny_model_dir)
    (root / "outputs/r0").mkdir(parents=True)
    result = run_cli("export-merged", "--config", str(root / "config.yaml"), "--run", "r0", cwd=root)
    assert result.code == 2
    assert "run r0: stage finetune-sft is missing (logs/r0/finetune-sft/manifest.json)" in result.stderr
    assert "ftpipe finetune-sft --run r0" in result.stderr


def test_full_model_as_adapter_is_refused(tmp_path, tiny_model_dir):
    """A merged/full model where the adapter should be: nothing to merge, one clear line, exit 2."""
    import shutil

    from stage_record import record_stage

    from ftpipe.config import load_config
    from ftpipe.core.runs import Project, new_run
    from ftpipe.core.stage import StageResult
    from tests.export.conftest import make_project

    root = make_project(tmp_path / "p", tiny_model_dir)
    loaded = load_config(root / "config.yaml")
    run = new_run(Project.from_config(loaded), "r1")

    def full_model_as_adapter(ctx):
        shutil.copytree(tiny_model_dir, run.adapter)
        return StageResult(outputs=[run.adapter])

    record_stage("finetune-sft", loaded, run, full_model_as_adapter)
    result = run_cli("export-merged", "--config", str(root / "config.yaml"), "--run", "r1", cwd=root)
    assert result.code == 2
    assert ("error: outputs/r1/adapter is a full model (config.json, no adapter_config.json): there is "
            "nothing to merge; use it directly (next: ftpipe export-gguf --run r1)") in result.stderr
    assert not (root / "outputs/r1/merged").exists()
