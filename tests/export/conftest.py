"""Fixtures of the export tests: a project with a completed (fabricated) finetune-sft run.

The adapter is a real peft LoRA on the tiny model with its B matrices set to small random values
(peft initialises B to zero, which would make the merge a no-op), wrapped in `ftpipe.core.stage.
execute` so the run has a genuine completed `finetune-sft` manifest.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]



def make_project(root: Path, model_dir: Path, dataset: str = "sentiment") -> Path:
    """config.yaml pointing at `model_dir` and a small prepared dataset with a val split."""
    root.mkdir(parents=True, exist_ok=True)
    # The executor finds stage venvs under the project root: link the real ones in, so the CLI
    # delegates export-gguf to .venv-gguf exactly as in the repository.
    for venv in (".venv", ".venv-gguf"):
        (root / venv).symlink_to(REPO / venv, target_is_directory=True)
    (root / "config.yaml").write_text(
        f"model:\n  path: {model_dir}\ndata:\n  name: {dataset}\n  source: data/x.jsonl\n"
        "merge:\n  verify_prompts: 3\n",
        encoding="utf-8",
    )
    prepared = root / "prepared" / dataset
    prepared.mkdir(parents=True)
    rows = [
        {"messages": [{"role": "user", "content": f"Label the review: the film was {w}."},
                      {"role": "assistant", "content": lab}]}
        for w, lab in (("wonderful", "positive"), ("dull", "negative"), ("moving", "positive"))
    ]
    rows[0]["messages"].insert(0, {"role": "system", "content": "You label reviews."})
    for split in ("train", "val"):
        (prepared / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root


def fabricate_finetune(root: Path, run_name: str = "r1", seed: int = 0) -> None:
    """A completed finetune-sft stage whose body writes a real peft adapter with nonzero B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftpipe.config import load_config
    from ftpipe.core.runs import Project, new_run
    from ftpipe.core.stage import StageContext, StageResult, execute

    loaded = load_config(root / "config.yaml")
    project = Project.from_config(loaded)
    run = new_run(project, run_name)
    model_path = Path(loaded.config.model.path)

    def body(ctx, plan):
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

    ctx = StageContext.for_run("finetune-sft", loaded, run)
    execute(ctx, lambda c: None, body, sections=("finetune",), inputs={}, environment="train")


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
