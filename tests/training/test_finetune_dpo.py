"""finetune-dpo on the tiny model: init=sft and init=base complete, the adapter is relative to the
raw base and differs from the SFT one, TensorBoard holds TRL's rewards, the demo pairs move from
~50% to >= 90% preference accuracy, SIGKILL + resume matches an uninterrupted run, refusals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftpipe.training.checkpoints import checkpoint_problems
from tests.conftest import REPO, run_cli
from tests.project_factory import make_project
from tests.training.conftest import ENV

# The demo's recommended `dpo:` settings (docs/dpo.md), on the demo preference set
# (data/demo/make_demo_data.py: the label + the matching smiley vs the other smiley).
DEMO_DPO = {"max_steps": 80, "batch_size": 8, "learning_rate": 2.0e-4, "beta": 0.1, "max_length": 128,
            "logging_steps": 10, "save_steps": 40}
CLI_ENV = {**os.environ, **ENV, "COLUMNS": "200", "NO_COLOR": "1"}


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _load(root: Path, *overrides: str):
    from ftpipe.config import load_config

    return load_config(root / "config.yaml", list(overrides))


@pytest.fixture(scope="module")
def dpo_project(tmp_path_factory) -> Path:
    """The demo's SFT model: debug_config.yaml's tiny model, preprocess-sft and finetune-sft settings
    (run `demo`), plus the demo preference pairs prepared by preprocess-dpo (400 train, 60 val) and
    the recommended `dpo:` settings."""
    import yaml

    from ftpipe.core.config import TinyModelConfig
    from ftpipe.stages import run_stage
    from ftpipe.training.tiny_model import build

    root = tmp_path_factory.mktemp("dpoproj")
    demo = yaml.safe_load((REPO / "debug_config.yaml").read_text(encoding="utf-8"))
    build(root / "models/tiny", TinyModelConfig(**demo["model"]["tiny"]), [REPO / "data/demo/sentiment.jsonl"])
    make_project(root, root / "models/tiny", {"preprocess": demo["preprocess"], "finetune": demo["finetune"],
                                              "dpo": DEMO_DPO}, preference=True, prepared=True)
    run_stage("finetune-sft", _load(root), "demo")
    return root


@pytest.fixture(scope="module")
def dpo_sft(dpo_project):
    """finetune-dpo, init=sft, in this process (the uninterrupted run the resume test compares with)."""
    from ftpipe.stages import run_stage

    started = time.monotonic()
    result = run_stage("finetune-dpo", _load(dpo_project), "demo")
    return result, time.monotonic() - started


def _manifest(root: Path, run: str) -> dict:
    return json.loads((root / f"logs/{run}/finetune-dpo/manifest.json").read_text())


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def _peft_model(root: Path, adapter: Path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(root / "models/tiny", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter))
    model.eval()
    return model


def test_init_sft_completes_with_a_frozen_sft_reference(dpo_project, dpo_sft):
    result, _ = dpo_sft
    manifest = _manifest(dpo_project, "demo")
    assert manifest["status"] == "completed"
    metrics = manifest["metrics"]
    assert metrics["init"] == "sft" and metrics["reference"] == "frozen copy of the SFT adapter"
    assert metrics["global_step"] == 80 and metrics["train_pairs"] == 400 and metrics["val_pairs"] == 60
    assert metrics["final_loss"] < metrics["first_logged_loss"]
    assert metrics["final_reward_accuracy"] >= 0.9 and metrics["final_reward_margin"] > 0
    assert metrics["eval_reward_accuracy"] >= 0.9
    assert metrics["seconds"] > 0
    # Only the "default" adapter trains: TRL's "ref" copy is frozen (else twice the SFT count).
    sft_metrics = json.loads((dpo_project / "logs/demo/finetune-sft/manifest.json").read_text())["metrics"]
    assert metrics["trainable_parameters"] == sft_metrics["trainable_parameters"]
    assert set(manifest["inputs"]) >= {"finetune-sft", "sft_adapter", "train", "val", "base_model"}
    paths = {o["path"] for o in manifest["outputs"]}
    assert "outputs/demo/dpo_adapter/adapter_model.safetensors" in paths
    run_log = (dpo_project / "logs/demo/finetune-dpo/run.log").read_text()
    assert "reference: frozen copy of the SFT adapter" in run_log
    assert "adapters: default, ref;" in run_log
    assert "step 10/80 loss " in run_log and "step 10/80 rewards: accuracy " in run_log
    assert "finetune-dpo: run demo: 80 steps on 400 pairs" in result.summary

    # Relative to the raw base: TRL's "ref" copy is not published, the adapter loads on the base
    # model alone, with the SFT adapter's LoRA settings, and differs from the SFT adapter.
    dpo_dir, sft_dir = dpo_project / "outputs/demo/dpo_adapter", dpo_project / "outputs/demo/adapter"
    assert not (dpo_dir / "ref").exists() and not list(dpo_project.glob("outputs/demo/.dpo_adapter*"))
    config = json.loads((dpo_dir / "adapter_config.json").read_text())
    sft_config = json.loads((sft_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == sft_config["base_model_name_or_path"]
    assert config["r"] == sft_config["r"] == 32
    dpo_w, sft_w = _weights(dpo_dir), _weights(sft_dir)
    assert dpo_w.keys() == sft_w.keys()
    assert any(not dpo_w[k].equal(sft_w[k]) for k in dpo_w)
    model = _peft_model(dpo_project, dpo_dir)
    assert list(model.peft_config) == ["default"]


def test_tensorboard_holds_the_dpo_rewards(dpo_project, dpo_sft):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = dpo_project / "outputs/demo/dpo_trainer_state/tensorboard"
    assert _manifest(dpo_project, "demo")["metrics"]["tensorboard_dir"] == "outputs/demo/dpo_trainer_state/tensorboard"
    events = list(folder.rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/rewards/chosen", "train/rewards/rejected", "train/rewards/margins",
            "train/rewards/accuracies", "train/loss"} <= tags
    # SFT's curves (read by the report) stay apart; `ftpipe tensorboard --run demo` shows both.
    assert not list((dpo_project / "outputs/demo/trainer_state").rglob("*dpo*"))
    from ftpipe.core.runs import Project
    from ftpipe.training.tensorboard import event_dirs

    dirs = event_dirs(Project.from_config(_load(dpo_project)), "demo", False)
    assert dirs == {"demo": dpo_project / "outputs/demo/trainer_state/tensorboard", "demo-dpo": folder}


def test_dpo_moves_the_held_out_preference_accuracy(dpo_project, dpo_sft):
    """On held-out pairs (products and templates never trained on) the demo's SFT model is not far
    from chance and DPO clearly above it; greedy answers take the chosen style."""
    from transformers import AutoTokenizer

    from ftpipe.handoff.measure import generate, preference_accuracy

    held_out = _read(REPO / "data/demo/preference_val.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(dpo_project / "models/tiny")
    sft = preference_accuracy(_peft_model(dpo_project, dpo_project / "outputs/demo/adapter"), tokenizer, held_out)
    dpo_model = _peft_model(dpo_project, dpo_project / "outputs/demo/dpo_adapter")
    dpo = preference_accuracy(dpo_model, tokenizer, held_out)
    # Measured on this CPU: SFT 0.68 (margin 0.45 nats), DPO 0.92 (margin 6.8 nats).
    assert 0.25 <= sft["accuracy"] <= 0.75, sft
    assert dpo["accuracy"] >= max(0.85, sft["accuracy"] + 0.15), (sft, dpo)
    assert dpo["mean_margin"] > sft["mean_margin"] + 3, (sft, dpo)

    # Greedy decoding: the answer opened with the label and " :" is finished with the matching
    # smiley by the DPO adapter, not by the SFT one (it never saw a smiley).
    sft_model = _peft_model(dpo_project, dpo_project / "outputs/demo/adapter")
    assert _smiley_rate(sft_model, tokenizer, held_out) <= 0.2
    assert _smiley_rate(dpo_model, tokenizer, held_out) >= 0.8


def _smiley_rate(model, tokenizer, pairs: list[dict]) -> float:
    from ftpipe.handoff.measure import greedy

    right = 0
    for pair in pairs:
        chosen = pair["chosen"][0]["content"]  # "positive :)" / "negative :("
        opening = chosen[:-1]
        enc = tokenizer.apply_chat_template(pair["prompt"] + [{"role": "assistant", "content": opening}],
                                            continue_final_message=True, tokenize=True, return_dict=True)
        new, _ = greedy(model, tokenizer, list(enc["input_ids"]), 2)
        right += (opening + tokenizer.decode(new, skip_special_tokens=True)).startswith(chosen)
    return right / len(pairs)


def test_init_base_trains_a_new_lora_against_the_base(dpo_project):
    from ftpipe.stages import run_stage

    # No SFT needed: a run folder of its own, no finetune-sft manifest in it.
    (dpo_project / "outputs/fresh").mkdir(parents=True)
    (dpo_project / "logs/fresh").mkdir(parents=True)
    loaded = _load(dpo_project, "dpo.init=base", "dpo.max_steps=4", "dpo.lora_r=8", "dpo.lora_alpha=16")
    result = run_stage("finetune-dpo", loaded, "fresh")
    metrics = _manifest(dpo_project, "fresh")["metrics"]
    assert metrics["init"] == "base" and metrics["reference"] == "base, adapter disabled"
    assert metrics["global_step"] == 4 and "reference: base, adapter disabled" in result.summary
    adapter = dpo_project / "outputs/fresh/dpo_adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 8
    assert list(_peft_model(dpo_project, adapter).peft_config) == ["default"]


def test_second_run_is_skipped(dpo_project, dpo_sft):
    from ftpipe.stages import run_stage

    again = run_stage("finetune-dpo", _load(dpo_project), "demo")
    assert again.skipped


def _start(project: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ftpipe", "finetune-dpo", "--config", str(project / "config.yaml"), *args],
        cwd=project, env=CLI_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(dpo_project, dpo_sft):
    # The same SFT adapter in a second run (a copy of run demo's), then DPO killed after checkpoint-40.
    for part in ("outputs/demo/adapter", "logs/demo/finetune-sft"):
        shutil.copytree(dpo_project / part, dpo_project / part.replace("demo", "killed"))
    state = dpo_project / "outputs/killed/dpo_trainer_state"
    proc = _start(dpo_project, "--run", "killed")
    deadline = time.monotonic() + 300
    while not ((state / "checkpoint-40").is_dir() and not checkpoint_problems(state / "checkpoint-40")):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"training ended before checkpoint-40 could be killed: {proc.communicate()}")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _manifest(dpo_project, "killed")["status"] == "running"
    assert not (dpo_project / "outputs/killed/dpo_adapter").exists()

    refused = run_cli("finetune-dpo", "--config", str(dpo_project / "config.yaml"), "--run", "killed",
                      cwd=dpo_project, env=ENV)
    assert refused.code == 2 and "run killed has DPO checkpoints from an unfinished training" in refused.stderr
    assert "(next: ftpipe finetune-dpo --run killed --resume-from latest (or --force to start over))" in refused.stderr

    resumed = run_cli("finetune-dpo", "--config", str(dpo_project / "config.yaml"), "--run", "killed",
                      "--resume-from", "latest", cwd=dpo_project, env=ENV)
    assert resumed.code == 0, resumed.output
    manifest = _manifest(dpo_project, "killed")
    assert manifest["status"] == "completed" and manifest["metrics"]["resumed_from"] == "checkpoint-40"
    assert manifest["metrics"]["global_step"] == 80
    got, want = _weights(dpo_project / "outputs/killed/dpo_adapter"), _weights(dpo_project / "outputs/demo/dpo_adapter")
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].allclose(want[key], rtol=1e-4, atol=1e-6), key


def test_init_sft_without_finetune_sft_is_one_line(dpo_project):
    (dpo_project / "outputs/nosft").mkdir(parents=True)
    (dpo_project / "logs/nosft").mkdir(parents=True)
    result = run_cli("finetune-dpo", "--config", str(dpo_project / "config.yaml"), "--run", "nosft",
                     cwd=dpo_project, env=ENV)
    assert result.code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "stage finetune-sft is missing" in lines[0] and "(next: ftpipe finetune-sft --run nosft)" in lines[0]


def test_more_than_one_process_is_refused_in_one_line(dpo_project):
    result = run_cli("finetune-dpo", "--config", str(dpo_project / "config.yaml"), "--run", "demo", "--force",
                     cwd=dpo_project, env={**ENV, "WORLD_SIZE": "2"})
    assert result.code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "finetune-dpo runs in one process (started with WORLD_SIZE=2)" in lines[0], result.stderr


def test_missing_pairs_name_preprocess_dpo(dpo_project):
    from ftpipe.core.errors import InputError
    from ftpipe.stages import run_stage

    with pytest.raises(InputError) as err:
        run_stage("finetune-dpo", _load(dpo_project, "preference.name=other"), "demo")
    assert "prepared/other/train.jsonl" in str(err.value) and err.value.hint == "ftpipe preprocess-dpo"


def test_bad_loss_type_names_the_key(dpo_project):
    from ftpipe.core.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        _load(dpo_project, "dpo.loss_type=nope")
    assert "dpo.loss_type" in str(err.value)


def test_sft_weight_adds_trls_sft_loss_to_the_preference_loss(tmp_path) -> None:
    """dpo.sft_weight > 0: TRL's loss types [<loss_type>, sft] weighted [1, sft_weight] (RPO); 0: the
    preference loss alone."""
    from ftpipe.training.config import DpoConfig
    from ftpipe.training.finetune_dpo import dpo_args

    plain = dpo_args(DpoConfig(), tmp_path, "cpu", "fp32", has_eval=False)
    assert plain.loss_type == ["sigmoid"] and plain.loss_weights is None
    mixed = dpo_args(DpoConfig(loss_type="apo_zero", sft_weight=0.5), tmp_path, "cpu", "fp32", has_eval=False)
    assert mixed.loss_type == ["apo_zero", "sft"] and mixed.loss_weights == [1.0, 0.5]
