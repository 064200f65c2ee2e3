"""The launch of several training processes, without training: launcher argv per case, the one-line
failure of a dead worker, the multi-node settings, the batch check of a resume (test_scale_out.py
runs the real thing)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftpipe.core.errors import InputError
from ftpipe.training.checkpoints import BatchShape, batch_record, check_resume_batch, write_batch_record
from ftpipe.training.config import FinetuneConfig
from ftpipe.training.finetune_sft import launch_command, worker_failure, world_size
from tests.conftest import run_cli

BIN = Path("/venv/bin")
JOB = Path("logs/r/finetune-sft/train_job.json")
WORKER = ["-m", "ftpipe.training.worker", str(JOB)]


@pytest.mark.parametrize("settings, device, accelerate, argv, name", [
    (dict(num_processes=2), "cpu", None,
     ["/venv/bin/torchrun", "--standalone", "--nproc_per_node", "2"], "torchrun --standalone (2)"),
    (dict(num_processes=4), "cuda", None,
     ["/venv/bin/accelerate", "launch", "--multi_gpu", "--num_processes", "4"], "accelerate launch --multi_gpu (4)"),
    (dict(nnodes=2, node_rank=1, rdzv_endpoint="node0:29500"), "cpu", None,
     ["/venv/bin/torchrun", "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
      "--rdzv_endpoint", "node0:29500", "--rdzv_id", "r", "--max_restarts", "0"], "torchrun c10d (2 nodes x 1)"),
    (dict(nnodes=3, num_processes=8, rdzv_endpoint="node0:29500"), "cuda", None,
     ["/venv/bin/torchrun", "--nnodes", "3", "--nproc_per_node", "8", "--rdzv_backend", "c10d",
      "--rdzv_endpoint", "node0:29500", "--rdzv_id", "r", "--max_restarts", "0"], "torchrun c10d (3 nodes x 8)"),
    # accelerate counts the processes of every machine.
    (dict(nnodes=2, node_rank=1, num_processes=8, rdzv_endpoint="node0:29500",
          accelerate_config="configs/accelerate/fsdp2.yaml"), "cuda", "fsdp2.yaml",
     ["/venv/bin/accelerate", "launch", "--config_file", "fsdp2.yaml", "--num_processes", "16", "--num_machines", "2",
      "--machine_rank", "1", "--main_process_ip", "node0", "--main_process_port", "29500"],
     "accelerate launch (configs/accelerate/fsdp2.yaml)"),
])
def test_launch_command(settings, device, accelerate, argv, name):
    ft = FinetuneConfig(**settings)
    got, launcher = launch_command(ft, device, JOB, "r", (Path(accelerate), {}) if accelerate else None, BIN)
    assert got == [*argv, *WORKER]
    assert launcher == name


def test_world_size_counts_every_node():
    assert world_size(FinetuneConfig(nnodes=2, num_processes=4, rdzv_endpoint="h:1"), None) == 8
    assert world_size(FinetuneConfig(accelerate_config="a.yaml"), {"num_processes": 16}) == 16


@pytest.mark.parametrize("settings, message", [
    (dict(nnodes=2), "finetune.rdzv_endpoint: needed with finetune.nnodes > 1"),
    (dict(nnodes=2, node_rank=2, rdzv_endpoint="h:1"), "finetune.node_rank: 2 is not below finetune.nnodes (2)"),
    (dict(nnodes=2, rdzv_endpoint="node0"), "finetune.rdzv_endpoint: 'node0' is not HOST:PORT"),
])
def test_multi_node_settings_are_checked(settings, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        FinetuneConfig(**settings)


def test_several_nodes_need_one_run_name(tmp_path):
    (tmp_path / "config.yaml").write_text("model:\n  path: m\ndata:\n  name: d\n")
    result = run_cli("finetune-sft", "--config", str(tmp_path / "config.yaml"), "--nnodes", "2", "--node-rank", "1",
                     "--rdzv-endpoint", "127.0.0.1:29500", cwd=tmp_path)
    assert result.code == 2, result.output
    assert result.stderr.strip().splitlines()[-1] == (
        "error: finetune.nnodes=2: every node must name the same run (next: add --run NAME, the same on every node)")
    assert not (tmp_path / "outputs").exists()


TORCHRUN_ROOT_CAUSE = """\
ftpipe.training.worker FAILED
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-26_03:46:08
  host      : node1
  rank      : 3 (local_rank: 1)
  exitcode  : -9 (pid: 10627)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 10627
============================================================
"""


def test_worker_failure_names_the_rank_and_why():
    assert worker_failure(TORCHRUN_ROOT_CAUSE) == (
        "rank 3 on node1 failed (Signal 9 (SIGKILL) received by PID 10627); the launcher stopped the other ranks")
    exited = TORCHRUN_ROOT_CAUSE.replace("-9 (pid", "1 (pid").replace(
        "Signal 9 (SIGKILL) received by PID 10627", "To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html")
    assert worker_failure(exited) == "rank 3 on node1 failed (exit code 1); the launcher stopped the other ranks"
    own = "[rank 1] 2026-11-26 03:46:08,1 ERROR ftpipe.training.worker: rank 1: prepared/x/train.jsonl: no rows\n"
    assert worker_failure(own + TORCHRUN_ROOT_CAUSE) == "rank 1: prepared/x/train.jsonl: no rows"
    assert worker_failure("one\nlast line\n") == "last line"


def _checkpoint(folder: Path, ranks: int, micro: int, sharded: bool = False) -> Path:
    folder.mkdir()
    (folder / "trainer_state.json").write_text(json.dumps({"train_batch_size": micro}))
    for rank in range(ranks):
        (folder / (f"rng_state_{rank}.pth" if ranks > 1 else "rng_state.pth")).write_bytes(b"")
    if sharded:
        (folder / "optimizer_0").mkdir()
    return folder


def test_batch_record_written_or_read_back_from_the_checkpoint(tmp_path):
    written = _checkpoint(tmp_path / "checkpoint-4", 2, 2)
    write_batch_record(written, BatchShape(2, 2, 3))
    assert batch_record(written, grad_accum=1) == BatchShape(2, 2, 3)
    # Killed between the save and the record: one rng_state per rank, rows per pass from HF's state.
    bare = _checkpoint(tmp_path / "checkpoint-8", 4, 2)
    assert batch_record(bare, grad_accum=2) == BatchShape(4, 2, 2)


def test_resume_batch_check(tmp_path):
    checkpoint = _checkpoint(tmp_path / "checkpoint-4", 2, 2)
    write_batch_record(checkpoint, BatchShape(2, 2, 1))
    check_resume_batch(checkpoint, BatchShape(1, 4, 1), grad_accum=1)  # same 4 rows per step
    check_resume_batch(checkpoint, BatchShape(1, 2, 2), grad_accum=2)  # ... split into 2 passes
    with pytest.raises(InputError) as refused:
        check_resume_batch(checkpoint, BatchShape(4, 2, 1), grad_accum=1)
    assert "4 processes x 2 rows x 1 accumulation = 8 rows per step" in refused.value.one_line()
    assert "--set finetune.batch_size=1 keeps 4 rows per step with 4 processes" in refused.value.one_line()
    with pytest.raises(InputError) as refused:  # 4 rows do not split over 3 processes
        check_resume_batch(checkpoint, BatchShape(3, 2, 1), grad_accum=1)
    assert "(next: resume with 2 processes (or --force to start over))" in refused.value.one_line()
    sharded = _checkpoint(tmp_path / "checkpoint-8", 2, 2, sharded=True)
    with pytest.raises(InputError, match="optimizer sharded over 2 processes"):
        check_resume_batch(sharded, BatchShape(1, 4, 1), grad_accum=1)
