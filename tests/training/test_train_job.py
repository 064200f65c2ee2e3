"""The training job file: typed config across the process hop to `python -m ftpipe.training.worker`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ftpipe.core.errors import InputError
from ftpipe.training.config import FinetuneConfig
from ftpipe.training.plan import TrainPlan
from ftpipe.training.sft import TrainJob


def _job(tmp_path) -> TrainJob:
    # Non-default values everywhere a dict round trip could lose them (list, literal, None vs int).
    ft = FinetuneConfig(method="dora", lora_r=8, target_modules=["q_proj", "v_proj"], packing="on",
                        eval_steps=5, micro_batch_size=2, learning_rate=1e-3, epochs=2.5)
    plan = TrainPlan("cpu", "fp32", "float32", False, True, {"precision": "test"}, micro_batch_size=2, grad_accum=2)
    return TrainJob(finetune=ft, plan=plan, load_from="models/tiny", model_kwargs={"trust_remote_code": False},
                    base_model_record={"id": None, "revision": None, "path": "models/tiny"},
                    train_file=str(tmp_path / "train.jsonl"), val_file=None, output_dir=str(tmp_path / "state"),
                    final_dir=str(tmp_path / "adapter"), resume_from=None, run_name="r1")


def test_round_trip_gives_the_same_typed_config(tmp_path):
    job = _job(tmp_path)
    job.write(tmp_path / "train_job.json")
    back = TrainJob.read(tmp_path / "train_job.json")
    assert isinstance(back.finetune, FinetuneConfig) and back.finetune == job.finetune
    assert isinstance(back.plan, TrainPlan) and back.plan == job.plan
    assert back == job


@pytest.mark.parametrize("section, key, value, named", [
    ("finetune", "lora_rank", 8, "finetune.lora_rank"),  # misspelt key
    ("finetune", "lora_r", "sixteen", "finetune.lora_r"),  # wrong type
    ("finetune", "method", "prefix", "finetune.method"),  # not one of the choices
    ("plan", "grad_accum", "two", "plan.grad_accum"),
    (None, "resume", "latest", "resume"),  # unknown top-level key
])
def test_a_bad_job_file_is_one_clear_error(tmp_path, section, key, value, named):
    _job(tmp_path).write(tmp_path / "train_job.json")
    data = json.loads((tmp_path / "train_job.json").read_text(encoding="utf-8"))
    (data[section] if section else data)[key] = value
    (tmp_path / "train_job.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(InputError) as err:
        TrainJob.read(tmp_path / "train_job.json")
    line = err.value.one_line()
    assert "\n" not in line
    assert f"{tmp_path / 'train_job.json'}: invalid: {named}:" in line


def _worker(job_file, tmp_path, rank: str):
    env = {**os.environ, "RANK": rank, "FTPIPE_WORKER_LOG": str(tmp_path / "run.log")}
    return subprocess.run([sys.executable, "-m", "ftpipe.training.worker", str(job_file)],
                          capture_output=True, text=True, env=env, timeout=120)


def test_the_worker_refuses_a_bad_job_file_in_one_line(tmp_path):
    """Exit 2 and one log line on stderr; rank 0 appends it to the stage's run.log, rank 1 does not."""
    bad = tmp_path / "train_job.json"
    bad.write_text(json.dumps({"finetune": {"lora_r": 0}}), encoding="utf-8")
    proc = _worker(bad, tmp_path, rank="1")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("[rank 1] ") and " ERROR " in lines[0] and ": rank 1: training job " in lines[0]
    assert "finetune.lora_r: Input should be greater than 0" in lines[0]
    assert not (tmp_path / "run.log").exists()

    proc = _worker(bad, tmp_path, rank="0")
    assert proc.returncode == 2, proc.stderr
    logged = (tmp_path / "run.log").read_text(encoding="utf-8").splitlines()
    assert len(logged) == 1 and " ERROR " in logged[0] and ": rank 0: training job " in logged[0]
    assert not logged[0].startswith("[rank")  # run.log lines look like the stage's own
