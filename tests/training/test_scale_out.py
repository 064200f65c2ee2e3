"""Scale-out on a real distributed engine: torch.distributed over gloo, 2 processes on this CPU.

- 2 processes (torchrun --standalone) give the adapter 1 process gives with the same global batch
  and seed, each rank reading its own shard and rank 0 alone writing logs, events and checkpoints;
- killing one rank fails the whole run cleanly, and the run resumes on another number of processes
  (same rows per step: it continues exactly; other rows per step: refused in one line);
- two "nodes" meeting through torchrun's c10d rendezvous on 127.0.0.1, started by the shipped Slurm
  script (configs/cluster/slurm.sbatch) under a stand-in `srun` that starts one task per node here;
- the shipped Kubernetes PyTorchJob renders, as the training operator sets its variables, to
  commands the CLI accepts.

Tolerance: the adapters of 1 and 2 processes differ only by the order of float32 sums (gradients
all-reduced across ranks), measured at <1e-4 of each tensor's largest value after 12 steps: the
tests allow 1e-3. Dropout is 0 and the learning rate constant (the killed run is longer).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ftpipe.training.checkpoints import checkpoint_problems
from tests.conftest import REPO, run_cli
from tests.training.conftest import ENV, free_port, write_project

pytestmark = pytest.mark.slow

TOLERANCE = 1e-3  # of each tensor's largest absolute value
STEPS = 12  # x 4 rows: inside the first epoch (54 packed sequences), where 1 and 2 processes agree
CLI_ENV = {**os.environ, **ENV, "COLUMNS": "200", "NO_COLOR": "1"}


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir) -> Path:
    return write_project(tmp_path_factory.mktemp("scale"), tiny_model_dir,
                         {"finetune": {"precision": "fp32", "lr_scheduler": "constant", "max_steps": STEPS}})


def finetune(project: Path, run: str, *args: str):
    return run_cli("finetune-sft", "--config", str(project / "config.yaml"), "--run", run, *args, cwd=project, env=ENV)


@pytest.fixture(scope="module")
def one_process(project) -> Path:
    """The reference: one process, 4 rows per step."""
    result = finetune(project, "one", "--set", "finetune.batch_size=4")
    assert result.code == 0, result.output
    return project / "outputs/one"


def metrics(project: Path, run: str) -> dict:
    return json.loads((project / f"logs/{run}/finetune-sft/manifest.json").read_text())["metrics"]


def assert_same_adapter(got_run: Path, want_run: Path) -> None:
    from safetensors.torch import load_file

    got = load_file(got_run / "adapter/adapter_model.safetensors")
    want = load_file(want_run / "adapter/adapter_model.safetensors")
    assert got.keys() == want.keys()
    for key, tensor in want.items():
        scale = float(tensor.abs().max()) or 1.0
        diff = float((got[key] - tensor).abs().max()) / scale
        assert diff <= TOLERANCE, f"{key}: differs by {diff:.2e} of its largest value"
    # ... and training moved them: equal adapters that never trained would prove nothing.
    assert any(float(t.abs().max()) > 0 for k, t in want.items() if "lora_B" in k)


def test_two_processes_equal_one_process(project, one_process):
    result = finetune(project, "two", "--num-processes", "2", "--set", "finetune.batch_size=2")
    assert result.code == 0, result.output
    two, one = metrics(project, "two"), metrics(project, "one")
    assert (two["world_size"], two["nodes"], two["launcher"]) == (2, 1, "torchrun --standalone (2)")
    assert (one["world_size"], one["launcher"]) == (1, "in-process")
    assert two["global_step"] == one["global_step"] == STEPS
    assert two["tokens_seen"] == one["tokens_seen"]  # counted on every rank, summed
    for key in ("first_logged_loss", "last_logged_loss", "eval_loss"):
        assert two[key] == pytest.approx(one[key], rel=1e-4), key
    assert_same_adapter(project / "outputs/two", one_process)

    # Each rank read its own half of the packed sequences ...
    logs = project / "logs/two/finetune-sft"
    workers = (logs / "workers.log").read_text()
    shards = dict(re.findall(r"rank (\d) of 2: (\d+) batches of 2 sequences per epoch", workers))
    total = int(re.search(r"its shard of the (\d+) training sequences", workers).group(1))
    assert set(shards) == {"0", "1"} and shards["0"] == shards["1"]
    # 2 ranks x 2 rows per batch cover every sequence once (a short last round is evened out)
    assert total <= 2 * 2 * int(shards["0"]) < total + 2 * 2
    # ... and rank 0 alone wrote the stage's log, the TensorBoard events and the weights.
    run_log = (logs / "run.log").read_text()
    assert "rank 0 of 2:" in run_log and "rank 1 of 2:" not in run_log
    events = list((project / "outputs/two/trainer_state/tensorboard").rglob("events.out.tfevents.*"))
    assert len({e.name.split(".")[-2] for e in events}) == 1  # events.out.tfevents.<time>.<host>.<pid>.<n>
    assert len(events) == len(list((one_process / "trainer_state/tensorboard").rglob("events.out.tfevents.*")))
    checkpoint = project / "outputs/two/trainer_state/checkpoint-12"
    assert {p.name for p in checkpoint.glob("rng_state*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert json.loads((checkpoint / "ftpipe_batch.json").read_text()) == {"world_size": 2, "micro_batch": 2,
                                                                         "grad_accum": 1}


def _worker_pids(job_file: Path) -> dict[int, int]:
    """rank -> pid of the training workers of one launch (found by their job file)."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            if b"ftpipe.training.worker" not in cmdline or str(job_file).encode() not in cmdline:
                continue
            env = dict(line.split(b"=", 1) for line in (proc / "environ").read_bytes().split(b"\0") if b"=" in line)
            found[int(env[b"RANK"])] = int(proc.name)
        except (OSError, ValueError, KeyError):
            continue
    return found


def test_killed_rank_fails_the_run_then_it_resumes_on_one_process(project, one_process):
    state = project / "outputs/killed/trainer_state"
    job_file = project / "logs/killed/finetune-sft/train_job.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ftpipe", "finetune-sft", "--config", str(project / "config.yaml"), "--run", "killed",
         "--num-processes", "2", "--set", "finetune.batch_size=2", "--set", "finetune.max_steps=400"],
        cwd=project, env=CLI_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not ((state / "checkpoint-4").is_dir() and not checkpoint_problems(state / "checkpoint-4")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    pids = _worker_pids(job_file)
    assert set(pids) == {0, 1}, pids
    os.kill(pids[1], signal.SIGKILL)
    killed_at = time.monotonic()
    out, err = proc.communicate(timeout=300)

    # The whole run failed, promptly, with no rank left behind and the error in one line.
    assert proc.returncode == 1, out + err
    assert time.monotonic() - killed_at < 120
    assert _worker_pids(job_file) == {}
    last = err.strip().splitlines()[-1]
    assert re.match(r"error: training workers failed \(exit 1\): rank 1 on \S+ failed \(Signal 9 \(SIGKILL\) "
                    r"received by PID \d+\); the launcher stopped the other ranks \(next: see "
                    r"logs/killed/finetune-sft/workers.log; then ftpipe finetune-sft --run killed --resume-from auto "
                    r"\(continues from checkpoint-\d+\)\)$", last), last
    manifest = json.loads((project / "logs/killed/finetune-sft/manifest.json").read_text())
    assert manifest["status"] == "failed"
    assert not (project / "outputs/killed/adapter").exists()

    # Another number of processes with other rows per step: refused before loading anything.
    refused = finetune(project, "killed", "--resume-from", "checkpoint-4", "--set", "finetune.batch_size=2")
    assert refused.code == 2, refused.output
    assert refused.stderr.strip().splitlines()[-1] == (
        "error: --resume-from: checkpoint-4 was trained with 2 processes x 2 rows x 1 accumulation = 4 rows per "
        "step; this launch would take 1 process x 2 rows x 1 accumulation = 2 rows per step: later steps would see "
        "other rows than the interrupted run (next: --set finetune.batch_size=4 keeps 4 rows per step with 1 "
        "process (or --force to start over))")

    # One process with the same 4 rows per step continues exactly: the adapter an uninterrupted
    # single-process run of the same steps produces.
    resumed = finetune(project, "killed", "--resume-from", "checkpoint-4", "--set", "finetune.batch_size=4")
    assert resumed.code == 0, resumed.output
    got = metrics(project, "killed")
    assert (got["resumed_from"], got["world_size"], got["global_step"]) == ("checkpoint-4", 1, STEPS)
    assert "same rows per step, so the step count and the data order continue" in \
        (project / "logs/killed/finetune-sft/run.log").read_text()
    assert_same_adapter(project / "outputs/killed", one_process)


def _stand_ins(folder: Path) -> Path:
    """`srun` (one task per node, all on this machine) and `scontrol show hostnames` (127.0.0.1)."""
    folder.mkdir(exist_ok=True)
    (folder / "srun").write_text(
        "#!/bin/bash\n"
        "# Slurm's srun with --ntasks-per-node=1: the command once per node, SLURM_NODEID set.\n"
        "while [[ $1 == --* ]]; do shift; done\n"
        "pids=()\n"
        "for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node \"$@\" & pids+=($!); done\n"
        "rc=0; for pid in \"${pids[@]}\"; do wait \"$pid\" || rc=$?; done; exit $rc\n")
    (folder / "scontrol").write_text("#!/bin/bash\nfor ((n = 0; n < SLURM_NNODES; n++)); do echo 127.0.0.1; done\n")
    for name in ("srun", "scontrol"):
        (folder / name).chmod(0o755)
    return folder


def test_slurm_script_trains_on_two_nodes_through_the_c10d_rendezvous(project, one_process, tmp_path):
    script = REPO / "configs/cluster/slurm.sbatch"
    nodes = int(re.search(r"^#SBATCH --nodes=(\d+)$", script.read_text(), re.M).group(1))
    assert nodes == 2
    env = {**CLI_ENV, "PATH": f"{_stand_ins(tmp_path / 'bin')}:{os.environ['PATH']}",
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[0-1]", "SLURM_NNODES": str(nodes),
           "FTPIPE": str(Path(sys.executable).parent / "ftpipe"), "GPUS_PER_NODE": "1", "PORT": str(free_port()),
           "CONFIG": str(project / "config.yaml")}
    result = subprocess.run(["bash", str(script)], cwd=project, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "finetune-sft: node 1 of 2 trained in run sft-4242; node 0 wrote outputs/sft-4242/adapter/" in \
        " ".join(result.stdout.split())
    got = metrics(project, "sft-4242")
    assert (got["world_size"], got["nodes"], got["launcher"]) == (2, 2, "torchrun c10d (2 nodes x 1)")
    logs = project / "logs/sft-4242/finetune-sft"
    assert "--rdzv_backend c10d --rdzv_endpoint 127.0.0.1:" in (logs / "run.log").read_text()
    assert (logs / "workers-node1.log").is_file()
    # 2 processes x 2 rows (the config's batch_size) = the reference's 4 rows per step.
    assert_same_adapter(project / "outputs/sft-4242", one_process)


def _k8s_expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' expansion of $(VAR) in a container's command (unknown names stay as written)."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), text)


def test_pytorchjob_renders_to_commands_the_cli_accepts():
    import typer.main

    from ftpipe.cli.main import app
    from ftpipe.training.config import FinetuneConfig

    job = yaml.safe_load((REPO / "configs/cluster/pytorchjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1
    nnodes = sum(r["replicas"] for r in replicas.values())
    command = typer.main.get_command(app).get_command(None, "finetune-sft")
    seen = []
    # The training operator's variables: PET_NODE_RANK is 0 on the Master, i + 1 on Worker i.
    for kind, spec in replicas.items():
        container = spec["template"]["spec"]["containers"][0]
        assert container["name"] == "pytorch"  # the operator finds its port on this container
        port = next(p["containerPort"] for p in container["ports"] if p["name"] == "pytorchjob-port")
        assert any(m["mountPath"] == container["workingDir"] for m in container["volumeMounts"])
        for index in range(spec["replicas"]):
            env = {"PET_NNODES": str(nnodes), "PET_NODE_RANK": str(index + (kind == "Worker")),
                   "PET_NPROC_PER_NODE": job["spec"]["nprocPerNode"], "MASTER_ADDR": "ftpipe-sft-master-0",
                   "MASTER_PORT": str(port)}
            argv = [_k8s_expand(a, env) for a in container["command"]]
            assert argv[:2] == ["ftpipe", "finetune-sft"] and not any("$(" in a for a in argv), argv
            ctx = command.make_context("finetune-sft", argv[2:])  # click raises on an unknown option or bad value
            values = ctx.params
            FinetuneConfig(nnodes=values["nnodes"], node_rank=values["node_rank"],
                           num_processes=values["num_processes"], rdzv_endpoint=values["rdzv_endpoint"])
            seen.append((values["node_rank"], values["nnodes"], values["rdzv_endpoint"], values["run"]))
    assert sorted(seen) == [(rank, 2, "ftpipe-sft-master-0:23456", "ftpipe-sft") for rank in range(nnodes)]
