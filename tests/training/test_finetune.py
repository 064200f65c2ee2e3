"""finetune-sft end to end on the tiny model: training, adapter, manifest, TensorBoard, skip, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.conftest import run_cli
from tests.training.conftest import ENV, free_port, log_history, logged_loss, write_project


@pytest.fixture(scope="module")
def trained(ft_project):
    """One CLI training run (`--run base`), shared by the tests below."""
    result = run_cli("finetune-sft", "--config", str(ft_project / "config.yaml"), "--run", "base", cwd=ft_project, env=ENV)
    assert result.code == 0, result.output
    return ft_project, result


def test_training_lowers_loss_and_writes_the_manifest(trained):
    project, result = trained
    manifest = json.loads((project / "logs/base/finetune-sft/manifest.json").read_text())
    assert manifest["status"] == "completed"
    metrics = manifest["metrics"]
    assert metrics["global_step"] == 8
    assert metrics["last_logged_loss"] < metrics["first_logged_loss"]
    assert metrics["eval_loss"] > 0
    # Device and precision were chosen automatically and recorded with the reason.
    assert metrics["device"] == "cpu"
    assert metrics["precision"] == "fp32"  # hidden 128 (or no native bf16): fp32 is faster on this CPU
    assert metrics["plan_reasons"]["precision"].startswith(("hidden size 128 < 512", "CPU without native bf16"))
    assert metrics["packing"] is True and metrics["gradient_checkpointing"] is False
    assert metrics["tokens_seen"] > 0 and metrics["tokens_per_s"] > 0
    paths = {o["path"] for o in manifest["outputs"]}
    assert "outputs/base/adapter/adapter_model.safetensors" in paths
    assert "outputs/base/trainer_state/ftpipe_train_results.json" in paths
    assert set(manifest["inputs"]) >= {"train", "val", "base_model"}
    # Progress lines in run.log: step, loss, tokens/s, ETA.
    run_log = (project / "logs/base/finetune-sft/run.log").read_text()
    assert "step 2/8 loss " in run_log and " tokens/s " in run_log and " eta " in run_log
    assert "finetune-sft: run base: 8 steps" in result.stdout


def test_adapter_loads_with_peft(trained, tiny_model_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    project, _ = trained
    adapter = project / "outputs/base/adapter"
    assert (adapter / "chat_template.jinja").is_file()
    assert (adapter / "adapter_config.json").is_file()
    base_ref = json.loads((adapter / "ftpipe_base_model.json").read_text())
    assert set(base_ref) == {"id", "revision", "path"}
    assert base_ref["path"] == str(tiny_model_dir)  # outside the project: kept absolute
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    ids = tokenizer("The kettle was broken.", return_tensors="pt").input_ids
    with torch.no_grad():
        before = base(ids).logits
        model = PeftModel.from_pretrained(base, adapter)
        after = model(ids).logits
    assert not torch.allclose(before, after)  # the trained adapter changes the output


def test_tensorboard_scalars_read_back(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    project, _ = trained
    events = EventAccumulator(str(project / "outputs/base/trainer_state/tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/num_input_tokens_seen"} <= tags
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [2, 4, 6, 8]
    history = log_history(project / "outputs/base")
    assert loss[0].value == pytest.approx(logged_loss(history, 2), rel=1e-6)
    tokens = [e.value for e in events.Scalars("train/num_input_tokens_seen")]
    assert tokens == sorted(tokens) and tokens[0] > 0


def test_second_run_with_same_config_is_skipped(trained):
    project, _ = trained
    manifest_before = (project / "logs/base/finetune-sft/manifest.json").read_text()
    result = run_cli("finetune-sft", "--config", str(project / "config.yaml"), "--run", "base", cwd=project, env=ENV)
    assert result.code == 0, result.output
    assert "finetune-sft: up to date, skipped (use --force to rerun)" in result.stdout
    assert (project / "logs/base/finetune-sft/manifest.json").read_text() == manifest_before


def test_tensorboard_command_serves_the_run(trained):
    project, _ = trained
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ftpipe", "tensorboard", "--config", str(project / "config.yaml"), "--run", "base",
         "--port", str(port)],
        cwd=project, env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        runs = None
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=5) as resp:
                    runs = json.loads(resp.read())
                if runs:
                    break
            except OSError:
                pass
            time.sleep(1)
        assert runs is not None and any(r.startswith("base") for r in runs), runs
        proc.terminate()  # SIGTERM to `ftpipe tensorboard` must stop TensorBoard too
        assert proc.wait(timeout=30) == 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _answers(port):
            time.sleep(0.5)
        assert not _answers(port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # never leave a server behind, even on failure
        except ProcessLookupError:
            pass


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=2):
            return True
    except OSError:
        return False


def test_missing_prepared_dataset_names_preprocess(tmp_path, tiny_model_dir):
    project = write_project(tmp_path, tiny_model_dir)
    (project / "prepared/sentiment/train.jsonl").unlink()
    result = run_cli("finetune-sft", "--config", str(project / "config.yaml"), cwd=project, env=ENV)
    assert result.code == 2
    assert (
        "error: no prepared dataset 'sentiment': prepared/sentiment/train.jsonl is missing "
        "(next: ftpipe preprocess-sft)" in result.stderr
    )
    assert not (project / "outputs").exists()  # checked before a run folder is created


def test_qlora_without_cuda_is_a_clear_error(tmp_path, tiny_model_dir):
    project = write_project(tmp_path, tiny_model_dir)
    result = run_cli("finetune-sft", "--config", str(project / "config.yaml"), "--set", "finetune.method=qlora",
                     cwd=project, env=ENV)
    assert result.code == 2
    assert (
        "error: finetune.method=qlora needs a CUDA GPU with bitsandbytes (4-bit base); this machine has no GPU "
        "(next: --set finetune.method=lora)" in result.stderr
    )
    assert not (project / "outputs").exists()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dora", "full"])
def test_dora_and_full_fine_tune(tmp_path, tiny_model_dir, method):
    from transformers import AutoModelForCausalLM

    from ftpipe.config import load_config
    from ftpipe.stages import run_stage

    project = write_project(tmp_path, tiny_model_dir)
    loaded = load_config(project / "config.yaml", [f"finetune.method={method}", "finetune.max_steps=2",
                                                   "finetune.max_length=64", "finetune.save_steps=100"])
    result = run_stage("finetune-sft", loaded, "m")
    assert result.metrics["method"] == method and result.metrics["global_step"] == 2
    adapter = project / "outputs/m/adapter"
    assert (adapter / "ftpipe_base_model.json").is_file() and (adapter / "chat_template.jinja").is_file()
    if method == "dora":
        assert json.loads((adapter / "adapter_config.json").read_text())["use_dora"] is True
    else:
        assert not (adapter / "adapter_config.json").exists()
        assert result.metrics["trainable_parameters"] == result.metrics["total_parameters"]
        AutoModelForCausalLM.from_pretrained(adapter)  # a complete model folder


def test_tensorboard_all_runs_and_errors(trained, tmp_path):
    from ftpipe.core.errors import InputError
    from ftpipe.core.runs import Project
    from ftpipe.training.tensorboard import command, event_dirs

    project_dir, _ = trained
    project = Project(project_dir, project_dir / "prepared", project_dir / "outputs", project_dir / "logs")
    dirs = event_dirs(project, None, all_runs=True)
    assert dirs["base"] == project_dir / "outputs/base/trainer_state/tensorboard"
    argv = command({"base": dirs["base"]}, "127.0.0.1", 6006)
    assert argv[1:] == ["-m", "tensorboard.main", "--logdir_spec", f"base:{dirs['base']}", "--host", "127.0.0.1",
                        "--port", "6006", "--reload_interval", "5"]
    empty = Project(tmp_path, tmp_path / "prepared", tmp_path / "outputs", tmp_path / "logs")
    with pytest.raises(InputError, match="no TensorBoard events in any run"):
        event_dirs(empty, None, all_runs=True)
    result = run_cli("tensorboard", "--config", str(project_dir / "config.yaml"), "--run", "base", "--all",
                     cwd=project_dir, env=ENV)
    assert result.code == 2 and "error: --run and --all exclude each other" in result.stderr


def test_no_held_out_rows_trains_without_evaluation(tmp_path, tiny_model_dir):
    """preprocess.val_fraction 0 writes an empty val.jsonl: finetune-sft trains without evaluation and
    says so (TRL took the empty eval set and stopped with a bare StopIteration, exit 1)."""
    project = write_project(tmp_path, tiny_model_dir, {"preprocess": {"val_fraction": 0.0}})
    assert (project / "prepared/sentiment/val.jsonl").read_text(encoding="utf-8") == ""
    result = run_cli("finetune-sft", "--config", str(project / "config.yaml"), "--run", "r",
                     "--set", "finetune.max_steps=2", cwd=project, env=ENV)
    assert result.code == 0, result.output[-3000:]
    assert "val.jsonl holds no rows: training without evaluation" in result.output
    manifest = json.loads((project / "logs/r/finetune-sft/manifest.json").read_text(encoding="utf-8"))
    assert manifest["status"] == "completed" and manifest["metrics"]["global_step"] == 2
    assert "eval_loss" not in manifest["metrics"]
