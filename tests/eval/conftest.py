"""Fixtures of the eval tests: a project whose run went through a short, real fine-tune.

The fine-tune is done here directly with TRL's SFTTrainer + peft (not with ftpipe's finetune
stage), on the demo sentiment data, under `stage_record.record_stage` (the manifest lifecycle with the
stage table's own sections) so the run has a genuine completed `finetune-sft` manifest;
TensorBoard events go under outputs/<run>/trainer_state/.
The merged model is made with peft's merge_and_unload under an `export-merged` manifest.
ENVIRONMENT.md: the tiny model learns the labels 0% -> 100% in 200 steps (hidden 128, 4 layers,
r=32). The session fixtures built from these helpers (`tuned_project`, `sft_dpo_project`) are in
tests/dpo_fixture.py: tests/serve uses them too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import tests.project_factory as factory

RUN = "r1"
SYSTEM = "Label the sentiment of the review as positive or negative."

CHECKS_YAML = f"""\
# Prompt checks for the eval tests: two the tuned model must pass (held-out reviews, labelled
# right, a bare label, then end-of-turn), one nobody can pass. The random base fails all three.
checks:
  - name: label-positive
    system: {SYSTEM}
    prompt: "Review of the scarf: lovely, sturdy."
    expect:
      exact: positive
      must_stop: true
  - name: label-negative
    system: {SYSTEM}
    prompt: "A flimsy and awful scarf, in my opinion."
    expect:
      regex: "^negative$"
      max_length: 10
  - name: impossible
    system: {SYSTEM}
    prompt: "A great and fantastic speaker, in my opinion."
    expect:
      contains: "this sentence is never generated"
"""


def make_project(root: Path, model_dir: Path, *, prepared: bool = True) -> Path:
    """The tiny model copied in (so the adapter's base path is project-relative), the demo data
    prepared by preprocess-sft unless `prepared` is false (720 train, 80 val rows: the checks'
    reviews are in neither), the eval settings and the checks file."""
    # Stage venvs are looked up in the project root first (then the ftpipe checkout): the train
    # venv is linked here, .venv-awq is not (the awq test points FTPIPE_VENV_ROOT here to hide it).
    return factory.make_project(
        root, model_dir, {
            "eval": {"prompts_file": "eval_checks.yaml", "max_new_tokens": 8, "samples": 2},
            "report": {"title": "Eval test report <sentiment & co>"},
        },
        model_in="models/tiny", prepared=prepared, venvs=[".venv"], files={"eval_checks.yaml": CHECKS_YAML},
    )


def fine_tune(root: Path, max_steps: int = 200, lr: float = 1e-3, scheduler: str = "cosine") -> None:
    """A real LoRA fine-tune with TRL, recorded as a completed finetune-sft stage of run r1."""
    import os

    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from stage_record import record_stage

    from ftpipe.config import load_config
    from ftpipe.core.runs import Project, new_run
    from ftpipe.core.stage import StageResult

    loaded = load_config(root / "config.yaml")
    project = Project.from_config(loaded)
    run = new_run(project, RUN)
    model_dir = root / "models" / "tiny"
    prepared = project.prepared_dir("sentiment")

    def body(ctx):
        tok = AutoTokenizer.from_pretrained(model_dir)
        data = load_dataset("json", data_files={"train": str(prepared / "train.jsonl"), "val": str(prepared / "val.jsonl")})
        eval_rows = data["val"].select(range(16))  # two eval points on the loss curve, cheaply
        args = SFTConfig(
            output_dir=str(run.trainer_state), max_steps=max_steps, per_device_train_batch_size=8,
            learning_rate=lr, lr_scheduler_type=scheduler, warmup_steps=0, logging_steps=10,
            eval_strategy="steps", eval_steps=50, per_device_eval_batch_size=16, save_strategy="no",
            report_to=["tensorboard"], use_cpu=True, bf16=False, gradient_checkpointing=False,
            assistant_only_loss=True, max_length=256, packing=False, seed=0, dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = SFTTrainer(
            model=str(model_dir), args=args, train_dataset=data["train"], eval_dataset=eval_rows,
            processing_class=tok,
            peft_config=LoraConfig(r=32, lora_alpha=64, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
        )
        trainer.train()
        trainer.model.save_pretrained(run.adapter)
        tok.save_pretrained(run.adapter)
        (run.adapter / "ftpipe_base_model.json").write_text(
            json.dumps({"id": None, "revision": None, "path": "models/tiny"}), encoding="utf-8"
        )
        return StageResult(outputs=[run.adapter], metrics={"train_loss": trainer.state.log_history[-1].get("train_loss")})

    import torch

    os.environ.pop("TENSORBOARD_LOGGING_DIR", None)  # events go to trainer_state/runs/
    threads = torch.get_num_threads()
    # One thread: on this shared 2-core box two OpenMP threads spin against other jobs and run
    # these tiny matmuls ~10x slower (measured: 60 steps 12 s with one thread, minutes with two).
    torch.set_num_threads(1)
    try:
        record_stage("finetune-sft", loaded, run, body, inputs={"train": prepared / "train.jsonl"})
    finally:
        torch.set_num_threads(threads)


def merge(root: Path) -> None:
    """outputs/r1/merged via peft merge_and_unload, recorded as a completed export-merged stage."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stage_record import record_stage

    from ftpipe.config import load_config
    from ftpipe.core.runs import Project, RunDir
    from ftpipe.core.stage import StageResult

    loaded = load_config(root / "config.yaml")
    run = RunDir(Project.from_config(loaded), RUN)

    def body(ctx):
        base = AutoModelForCausalLM.from_pretrained(root / "models" / "tiny", dtype=torch.float32)
        merged = PeftModel.from_pretrained(base, run.adapter).merge_and_unload()
        merged.save_pretrained(run.merged)
        AutoTokenizer.from_pretrained(run.adapter).save_pretrained(run.merged)
        shutil.copy(run.adapter / "ftpipe_base_model.json", run.merged / "ftpipe_base_model.json")
        return StageResult(outputs=[run.merged])

    record_stage("export-merged", loaded, run, body, inputs={"adapter": run.adapter})


def cli(command: str, root: Path, *args: str, env: dict | None = None):
    """`ftpipe <command> --config <root>/config.yaml ARGS` in a subprocess, one OpenMP thread."""
    from tests.conftest import run_cli

    return run_cli(command, "--config", str(root / "config.yaml"), *args, env={"OMP_NUM_THREADS": "1", **(env or {})})


@pytest.fixture(scope="session")
def evaluated(tuned_project, tmp_path_factory):
    """`ftpipe eval-sft` run once on a copy of the tuned project (`tuned_project`, tests/dpo_fixture.py,
    stays as trained: `sft_dpo_project` is made from it): (project root, CLI result)."""
    from tests.dpo_fixture import copy_project

    root = copy_project(tuned_project, tmp_path_factory.mktemp("evaluated") / "proj")
    return root, cli("eval-sft", root, "--run", RUN)


# ---------------------------------------------------------------------- preference tuning (DPO)

PREF = "sentiment-pref"  # preference.name: prepared/sentiment-pref/{train,val}.jsonl
OPPOSITE = {"positive": "negative", "negative": "positive"}


def write_pairs(root: Path) -> None:
    """prepared/sentiment-pref/ by preprocess-dpo from pairs made of the prepared sentiment split
    (prompt = system + review, chosen = the right label, rejected = the other one), its train and
    val pairs from the split's train and val rows (data/sentiment-pref.jsonl, sentiment-pref_val.jsonl),
    so the held-out pairs are held out from the SFT run too; and the `preference` section naming them."""
    for split, source in (("train", f"data/{PREF}.jsonl"), ("val", f"data/{PREF}_val.jsonl")):
        lines = []
        for line in (root / "prepared" / "sentiment" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            messages = json.loads(line)["messages"]
            label = messages[-1]["content"]
            lines.append(json.dumps({"prompt": messages[:-1], "chosen": [{"role": "assistant", "content": label}],
                                     "rejected": [{"role": "assistant", "content": OPPOSITE[label]}]}))
        (root / source).write_text("\n".join(lines) + "\n", encoding="utf-8")
    factory.update_config(root, {"preference": {"name": PREF, "source": f"data/{PREF}.jsonl",
                                                "val_source": f"data/{PREF}_val.jsonl"}})
    factory.prepare(root, "preprocess-dpo")


def dpo_tune(root: Path, max_steps: int = 20, pairs: int = 80) -> None:
    """A real DPO fine-tune (sigmoid + NLL on the chosen answer) with TRL's DPOTrainer from the SFT
    adapter of run r1 (the reference: a frozen copy of it), saved as a LoRA adapter on the raw base in outputs/r1/dpo_adapter under a
    completed finetune-dpo manifest (the layout of ftpipe's finetune-dpo stage)."""
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from stage_record import record_stage

    from ftpipe.config import load_config
    from ftpipe.core.runs import Project, RunDir
    from ftpipe.core.stage import StageResult
    from ftpipe.handoff.pairs import read_pairs

    loaded = load_config(root / "config.yaml")
    project = Project.from_config(loaded)
    run = RunDir(project, RUN)
    train = project.prepared_dir(PREF) / "train.jsonl"
    folder = run.path / "dpo_adapter"

    def body(ctx):
        tok = AutoTokenizer.from_pretrained(run.adapter)
        base = AutoModelForCausalLM.from_pretrained(root / "models" / "tiny", dtype=torch.float32)
        model = PeftModel.from_pretrained(base, run.adapter, is_trainable=True)
        args = DPOConfig(
            output_dir=str(run.path / "dpo_trainer_state"), max_steps=max_steps, per_device_train_batch_size=8,
            learning_rate=5e-4, lr_scheduler_type="constant", warmup_steps=0, beta=0.1, logging_steps=5,
            # DPO alone drifts the end-of-turn token both answers share ("negativepositive..." after 20
            # steps, measured); the added NLL on the chosen answer (RPO) keeps the answers stopping.
            loss_type=["sigmoid", "sft"], loss_weights=[1.0, 1.0],
            save_strategy="no", report_to=[], use_cpu=True, bf16=False, gradient_checkpointing=False,
            max_length=256, seed=0, dataloader_num_workers=0, disable_tqdm=True,
        )
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(list(read_pairs(train, pairs))),
                             processing_class=tok)
        trainer.train()
        trainer.model.save_pretrained(folder, selected_adapters=["default"])
        tok.save_pretrained(folder)
        shutil.copy(run.adapter / "ftpipe_base_model.json", folder / "ftpipe_base_model.json")
        return StageResult(outputs=[folder])

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see fine_tune
    try:
        record_stage("finetune-dpo", loaded, run, body, inputs={"train": train})
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------- general checks, held-out text, bounds, GGUF (eval-sft)

# Unrelated to the sentiment task. The random base answers 8 random tokens: it passes
# "short-answer" and "not-a-label" and never stops. The tuned model answers a label to anything.
GENERAL_YAML = """\
checks:
  - name: short-answer
    prompt: "What is the capital of France?"
    expect: {max_length: 200}
  - name: not-a-label
    prompt: "Name a colour."
    expect: {regex: "^(?!(positive|negative)$)"}
  - name: stops
    prompt: "Say hello."
    expect: {must_stop: true}
"""

# Held-out plain text, three documents (blank-line separated), none of it in the sentiment data.
HELDOUT_TXT = """\
The river rose slowly through the night, and by morning the low fields were under water.

Farmers moved their animals to the hills.
  Some of them stayed there for a week.
   \t
Once the water went down, the soil was darker and richer than before.
"""


@pytest.fixture(scope="session")
def evaluated_general(tuned_project, tmp_path_factory):
    """eval-sft of base, adapter and merged on a copy of the tuned run, with general checks,
    held-out text and bounds it passes: (project root, CLI result)."""
    from tests.dpo_fixture import copy_project

    root = copy_project(tuned_project, tmp_path_factory.mktemp("evaluated-general") / "proj")
    (root / "general_checks.yaml").write_text(GENERAL_YAML, encoding="utf-8")
    (root / "heldout.txt").write_text(HELDOUT_TXT, encoding="utf-8")
    factory.update_config(root, {"eval": {"general_file": "general_checks.yaml", "perplexity_file": "heldout.txt",
                                          "artifacts": ["base", "adapter", "merged"],
                                          # bounds the run passes: base 0/3, tuned 2/3, kept 1/2
                                          "max_base_pass_rate": 0.3, "min_tuned_pass_rate": 0.6,
                                          "min_general_kept": 0.5}})
    return root, cli("eval-sft", root, "--run", RUN)
