"""Fixtures of the export tests: a project with a completed (fabricated) finetune-sft run.

The adapter is a real peft LoRA on the tiny model with its B matrices set to small random values
(peft initialises B to zero, which would make the merge a no-op), written under `record_stage`
(tests/stage_record.py) so the run has a genuine completed `finetune-sft` manifest.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tests.project_factory as factory

REPO = Path(__file__).resolve().parents[2]


def make_project(root: Path, model_dir: Path, *, prepared: bool = True) -> Path:
    """config.yaml pointing at `model_dir`, the demo data prepared by preprocess-sft (its val split
    is what export-merged verifies on and ollama-load chats with) unless `prepared` is false."""
    # The executor finds stage venvs under the project root: link the real ones in, so the CLI
    # delegates export-gguf to .venv-gguf exactly as in the repository.
    return factory.make_project(root, model_dir, {"merge": {"verify_prompts": 3}}, prepared=prepared,
                                venvs=[".venv", ".venv-gguf"])


def fabricate_finetune(root: Path, run_name: str = "r1", seed: int = 0) -> None:
    """A completed finetune-sft stage whose body writes a real peft adapter with nonzero B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stage_record import record_stage

    from ftpipe.config import load_config
    from ftpipe.core.runs import Project, new_run
    from ftpipe.core.stage import StageResult

    loaded = load_config(root / "config.yaml")
    project = Project.from_config(loaded)
    run = new_run(project, run_name)
    model_path = Path(loaded.config.model.path)

    def body(ctx):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.05)
        peft_model.save_pretrained(run.adapter)
        tok = AutoTokenizer.from_pretrained(model_path)
        tok.save_pretrained(run.adapter)
        (run.adapter / "ftpipe_base_model.json").write_text(
            json.dumps({"id": None, "revision": None, "path": str(model_path)}), encoding="utf-8"
        )
        return StageResult(outputs=[run.adapter], summary="fabricated adapter")

    record_stage("finetune-sft", loaded, run, body)


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A project with run r1: tied tiny Llama + adapter, finetune-sft completed."""
    root = make_project(tmp_path_factory.mktemp("proj-llama"), tiny_model_dir)
    fabricate_finetune(root)
    return root


@pytest.fixture(scope="module")
def qwen_run(tmp_path_factory, tiny_qwen_dir) -> Path:
    """A project with run r1: untied tiny Qwen2 + adapter, finetune-sft completed."""
    root = make_project(tmp_path_factory.mktemp("proj-qwen"), tiny_qwen_dir)
    fabricate_finetune(root, seed=1)
    return root
