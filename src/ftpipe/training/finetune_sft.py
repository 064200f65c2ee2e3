"""Stage `finetune-sft`: LoRA / DoRA / QLoRA / full SFT of the base model on prepared/<data.name>/.

Second stage of the pipeline (after `preprocess-sft`, before `export-merged`). Reads
prepared/<data.name>/train.jsonl and val.jsonl and writes outputs/<run>/adapter/ and
outputs/<run>/trainer_state/ (checkpoints, tensorboard/). On several nodes, node 0's command is
the stage; the others `join` its training (docs/scaling.md).

- `check(ctx)`: the prepared dataset, the base model folder, settings this machine cannot run;
- `plan(ctx)`: device / precision / checkpointing / packing for this machine (`plan.py`), the
  checkpoint to resume from, all in a `TrainJob` (`FinetuneSftPlan`);
- `run(ctx, plan)`: trains with TRL's SFTTrainer through the shared harness (`sft.py`,
  `harness.py`) in this process or, with `finetune.num_processes > 1`, `finetune.accelerate_config`
  or `finetune.nnodes > 1`, in workers started by torchrun (CPU: gloo; several nodes: c10d
  rendezvous) or `accelerate launch` (GPUs);
- `join(ctx)`: a node with `finetune.node_rank > 0` takes part in node 0's training.

    ftpipe finetune-sft --config debug_config.yaml --run demo
    ftpipe finetune-sft --run big --nnodes 2 --node-rank 0 --rdzv-endpoint node0:29500   # and --node-rank 1
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ftpipe.core.errors import ConfigError, InputError, StageError
from ftpipe.core.logs import WORKER_LOG_ENV
from ftpipe.core.model_ref import resolve_model
from ftpipe.core.runs import Project
from ftpipe.core.stage import StageContext, StageResult
from ftpipe.handoff import chosen_template
from ftpipe.training.checkpoints import BatchShape, check_resume_batch, clear_for_fresh_start, resolve_resume
from ftpipe.training.harness import TENSORBOARD_DIR
from ftpipe.training.sft import COMMAND, RESULTS_FILE, TrainJob

JOB_FILE = "train_job.json"

log = logging.getLogger(__name__)

SAMPLE_ROWS = 200  # conversations tokenized to decide on packing


@dataclass(frozen=True)
class FinetuneSftPlan:
    """What finetune-sft resolved before training: the job every training process runs, and the launch."""

    job: TrainJob  # config, device / precision plan, paths, the checkpoint to resume from
    accelerate: tuple[Path, dict[str, Any]] | None  # finetune.accelerate_config: its file and settings


def check(ctx: StageContext) -> dict[str, Path]:
    """Everything training needs, checked before the run folder is created (`new-run` scope).

    Returns:
        The inputs to record: train (and val) rows, the prepared set's manifest, the base model folder.

    Raises:
        InputError: prepared dataset missing (names `ftpipe preprocess-sft`).
        ConfigError: several nodes without one run name, settings this machine cannot run (QLoRA
            without CUDA, a GPU accelerate config without a GPU...).
    """
    ft = ctx.config.finetune
    if ft.nnodes > 1 and ctx.run_name is None and ctx.run is None:
        raise ConfigError(f"finetune.nnodes={ft.nnodes}: every node must name the same run",
                          hint="add --run NAME, the same on every node")
    inputs = _inputs(ctx.project, ctx.config)
    _check_hardware(ft, ctx.project)
    return inputs


def _accelerate_config(project: Project, ft) -> tuple[Path, dict]:
    """`finetune.accelerate_config`: its path and its settings (an empty dict if not a mapping).

    Raises:
        ConfigError: the file does not exist.
    """
    import yaml

    config_file = project.resolve(ft.accelerate_config)
    if not config_file.is_file():
        raise ConfigError(f"finetune.accelerate_config: {ft.accelerate_config} not found",
                          hint="see configs/accelerate/ for multi-GPU, FSDP2 and ZeRO-3 examples")
    launch = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    return config_file, launch if isinstance(launch, dict) else {}


def _check_hardware(ft, project: Project) -> None:
    """GPU-only settings fail here, in a second, not after the model is loaded."""
    import torch

    launch = _accelerate_config(project, ft)[1] if ft.accelerate_config else None
    if torch.cuda.is_available():
        return
    if launch is not None:
        kind = str(launch.get("distributed_type", "NO"))
        # Without CUDA, accelerate quietly runs a GPU config on CPU processes (emulated bf16, ~20x
        # slower than one process) or dies after loading the model (DeepSpeed): refuse it here.
        if kind not in ("NO", "MULTI_CPU") and not launch.get("use_cpu", False):
            raise ConfigError(
                f"finetune.accelerate_config {ft.accelerate_config} is a GPU config (distributed_type {kind}) "
                "and this machine has no CUDA GPU",
                hint="--num-processes 2 runs DDP over gloo on the CPU (docs/scaling.md)",
            )
    if ft.method == "qlora":
        raise ConfigError(
            "finetune.method=qlora needs a CUDA GPU with bitsandbytes (4-bit base); this machine has no GPU",
            hint="--set finetune.method=lora",
        )
    if ft.precision == "fp16":
        raise ConfigError("finetune.precision=fp16 needs a CUDA GPU", hint="--set finetune.precision=auto")


def _inputs(project: Project, cfg) -> dict[str, Path]:
    prepared = project.prepared_dir(cfg.data.name)
    train = prepared / "train.jsonl"
    if not train.is_file():
        raise InputError(
            f"no prepared dataset {cfg.data.name!r}: {project.rel(train)} is missing",
            hint="ftpipe preprocess-sft",
        )
    inputs = {"train": train}
    val = prepared / "val.jsonl"
    if val.is_file():
        inputs["val"] = val
    prepared_manifest = project.prepared_log_dir(cfg.data.name) / "manifest.json"
    if prepared_manifest.is_file():
        inputs["prepared_manifest"] = prepared_manifest
    model_ref = resolve_model(cfg.model, project.root)
    if model_ref.path:
        inputs["base_model"] = Path(model_ref.path)
    inputs.update(chosen_template.require(cfg.model, project.root, model_ref.path, "ftpipe finetune-sft"))
    return inputs


def plan(ctx: StageContext) -> FinetuneSftPlan:
    """Device, precision, base dtype, checkpointing, packing (each with its reason) and the resume point.

    Raises:
        InputError: the tokenizer has no chat template and `model.chat_template` is not set, no training
            rows, an unusable `--resume-from` (`ctx.options["resume_from"]`: None | "latest" | "auto" |
            checkpoint path).
        ConfigError: settings this machine cannot run; a `model.chat_template` that cannot be used.
    """
    from transformers import AutoConfig, AutoTokenizer

    from ftpipe.handoff.prepared import read_chat_rows
    from ftpipe.training.plan import make_plan

    cfg, project = ctx.config, ctx.project
    ft = cfg.finetune
    model_ref = resolve_model(cfg.model, project.root)
    prepared = project.prepared_dir(cfg.data.name)
    train_file, val_file = prepared / "train.jsonl", prepared / "val.jsonl"
    model_kwargs: dict[str, Any] = {**model_ref.pretrained_kwargs(), "trust_remote_code": cfg.model.trust_remote_code}

    model_config = AutoConfig.from_pretrained(model_ref.load_from, **model_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(model_ref.load_from, **model_kwargs)
    # the adapter saves it with the tokenizer
    chosen = chosen_template.use(tokenizer, cfg.model, project.root, cfg.model.path or model_ref.load_from,
                                 "ftpipe finetune-sft")
    rows = read_chat_rows(train_file)
    if not rows:
        raise InputError(f"{project.rel(train_file)}: no rows", hint="ftpipe preprocess-sft --force")
    train_plan = make_plan(ft, model_config, ft.method, _sample_lengths(tokenizer, rows[:SAMPLE_ROWS]))
    if cfg.model.dtype != "auto" and ft.method != "qlora":
        train_plan = replace(train_plan, base_dtype=cfg.model.dtype,
                             reasons={**train_plan.reasons, "base_dtype": "model.dtype"})
    for key, why in train_plan.reasons.items():
        log.info("plan: %s = %s (%s)", key, getattr(train_plan, key), why)

    # Resume from a complete checkpoint whose batch this launch continues (or start over in run()).
    accelerate = _accelerate_config(project, ft) if ft.accelerate_config else None
    output_dir = ctx.run.trainer_state
    resume = resolve_resume(ctx.options.get("resume_from"), output_dir, project.rel)
    if resume is not None:
        log.info("resuming from %s", project.rel(resume))
        world = world_size(ft, accelerate[1] if accelerate else None)
        check_resume_batch(resume, BatchShape(world, train_plan.micro_batch_size or ft.batch_size,
                                              train_plan.grad_accum), ft.grad_accum, project.rel)

    # method=full writes the whole model to adapter/ too (config.json, no adapter_config.json):
    # export-merged recognises it and says there is nothing to merge.
    job = TrainJob(
        finetune=ft,
        plan=train_plan,
        load_from=model_ref.load_from,
        model_kwargs=model_kwargs,
        base_model_record=model_ref.record(project.root),
        train_file=str(train_file),
        val_file=str(val_file) if val_file.is_file() else None,
        output_dir=str(output_dir),
        final_dir=str(ctx.run.adapter),
        resume_from=str(resume) if resume else None,
        run_name=ctx.run.name,
        chat_template=chosen.text if chosen is not None else None,
        chat_template_record=chosen_template.record(tokenizer, chosen),
    )
    return FinetuneSftPlan(job=job, accelerate=accelerate)


def run(ctx: StageContext, plan: FinetuneSftPlan) -> StageResult:
    """Prepare the trainer_state folder, train (here or in workers), report.

    Raises:
        InputError: checkpoints of an unfinished training, neither resumed nor `--force`d.
        Interrupted: Ctrl-C / SIGTERM stopped training after a checkpoint was saved (exit 130).
        StageError: a training worker failed.
    """
    from ftpipe.training.sft import train

    job, project, run_dir = plan.job, ctx.project, ctx.run
    ft, train_plan = job.finetune, job.plan
    output_dir, final_dir = Path(job.output_dir), Path(job.final_dir)
    # Never silently drop the checkpoints of an interrupted run.
    if job.resume_from is None:
        clear_for_fresh_start(ctx, output_dir, output_dir / TENSORBOARD_DIR, COMMAND)
    output_dir.mkdir(parents=True, exist_ok=True)

    # Train: in this process, or in N workers running the same `train(job)`.
    results_file = output_dir / RESULTS_FILE
    results_file.unlink(missing_ok=True)
    if multi_process(ft):
        job.write(ctx.log_dir / JOB_FILE)  # before the launch: joining nodes' workers read it after the rendezvous
        launcher = _launch_workers(ctx, train_plan.device, plan.accelerate)
        metrics = _read_results(results_file)
    else:
        launcher = "in-process"
        metrics = train(job, progress=ctx.progress)

    metrics.update(
        launcher=launcher, nodes=ft.nnodes,
        device=train_plan.device, precision=train_plan.precision, base_dtype=train_plan.base_dtype,
        gradient_checkpointing=train_plan.gradient_checkpointing, packing=train_plan.packing,
        micro_batch_size=train_plan.micro_batch_size, grad_accum=train_plan.grad_accum,
        plan_reasons=train_plan.reasons, method=ft.method, tensorboard_dir=project.rel(output_dir / TENSORBOARD_DIR),
        chat_template=job.chat_template_record,
    )
    first, last = metrics.get("first_logged_loss"), metrics.get("last_logged_loss")
    losses = f"loss {first:.4f} -> {last:.4f}" if first is not None and last is not None else "no loss logged"
    unlocated = metrics.get("assistant_turns_unlocated", 0) + metrics.get("val_assistant_turns_unlocated", 0)
    summary = (
        f"finetune-sft: run {run_dir.name}: {metrics['global_step']} steps, {losses}, "
        f"{metrics['tokens_per_s']:.0f} tokens/s ({train_plan.device}, {train_plan.precision}) -> "
        f"{project.rel(final_dir)}/"
        + (f" ({unlocated} assistant turns not located, not trained: see run.log)" if unlocated else "")
    )
    return StageResult(outputs=[final_dir, results_file], metrics=metrics, summary=summary)


def _sample_lengths(tokenizer, rows: list[dict]) -> list[int]:
    lengths = []
    for row in rows:
        text = tokenizer.apply_chat_template(row["messages"], tools=row.get("tools"), tokenize=False)
        lengths.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return lengths


def multi_process(ft) -> bool:
    """Whether training runs in workers started by a launcher (several processes or nodes)."""
    return ft.num_processes > 1 or bool(ft.accelerate_config) or ft.nnodes > 1


def world_size(ft, launch: dict | None) -> int:
    """Training processes in all: nodes x processes per node (an accelerate config's count otherwise)."""
    if ft.accelerate_config and ft.num_processes == 1 and launch and launch.get("num_processes"):
        return int(launch["num_processes"])  # accelerate counts every machine's processes
    return ft.nnodes * ft.num_processes


def launch_command(ft, device: str, job_file: Path, run_name: str, accelerate: tuple[Path, dict] | None = None,
                   bin_dir: Path | None = None) -> tuple[list[str], str]:
    """The launcher's argv for this node and how the manifest names it.

    - one node, CPU: `torchrun --standalone` (accelerate launch --cpu starts one process here);
    - several nodes (CPU or GPUs): `torchrun` with the c10d rendezvous at `rdzv_endpoint`, the run
      name as rendezvous id (the same on every node);
    - an accelerate config: `accelerate launch --config_file` (machine flags added for several nodes);
    - GPUs, no config: `accelerate launch --multi_gpu`.
    """
    bin_dir = bin_dir or Path(sys.executable).parent
    worker = ["-m", "ftpipe.training.worker", str(job_file)]
    if ft.accelerate_config and accelerate is not None:
        config_file, launch = accelerate
        argv = [str(bin_dir / "accelerate"), "launch", "--config_file", str(config_file)]
        if ft.num_processes > 1:  # accelerate's --num_processes counts the processes of every machine
            argv += ["--num_processes", str(ft.nnodes * ft.num_processes)]
        if ft.nnodes > 1:
            host, port = ft.rdzv_endpoint.rsplit(":", 1)
            argv += ["--num_machines", str(ft.nnodes), "--machine_rank", str(ft.node_rank),
                     "--main_process_ip", host, "--main_process_port", port]
        return [*argv, *worker], f"accelerate launch ({ft.accelerate_config})"
    if ft.nnodes > 1:
        argv = [str(bin_dir / "torchrun"), "--nnodes", str(ft.nnodes), "--nproc_per_node", str(ft.num_processes),
                "--rdzv_backend", "c10d", "--rdzv_endpoint", ft.rdzv_endpoint, "--rdzv_id", run_name,
                "--max_restarts", "0"]
        return [*argv, *worker], f"torchrun c10d ({ft.nnodes} nodes x {ft.num_processes})"
    if device == "cpu":
        argv = [str(bin_dir / "torchrun"), "--standalone", "--nproc_per_node", str(ft.num_processes)]
        return [*argv, *worker], f"torchrun --standalone ({ft.num_processes})"
    argv = [str(bin_dir / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(ft.num_processes)]
    return [*argv, *worker], f"accelerate launch --multi_gpu ({ft.num_processes})"


def _launch_workers(ctx: StageContext, device: str, accelerate: tuple[Path, dict[str, Any]] | None) -> str:
    """Run `python -m ftpipe.training.worker JOB` under this node's launcher; returns the launcher's name.

    Raises:
        Interrupted: Ctrl-C / SIGTERM stopped the workers after they saved a checkpoint.
        StageError: a worker failed (which rank, why, and the resume command).
    """
    ft = ctx.config.finetune
    argv, launcher = launch_command(ft, device, ctx.log_dir / JOB_FILE, ctx.run.name, accelerate)
    env = {**os.environ, WORKER_LOG_ENV: str(ctx.log_dir / "run.log")}  # global rank 0 appends to run.log
    if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        from ftpipe.training.plan import thread_count

        env["OMP_NUM_THREADS"] = str(max(1, thread_count() // ft.num_processes))
    name = "workers.log" if ft.node_rank == 0 else f"workers-node{ft.node_rank}.log"
    workers_log = ctx.log_dir / name
    log.info("launching %s: %s (output in %s)", launcher, " ".join(argv), ctx.project.rel(workers_log))
    start = workers_log.stat().st_size if workers_log.exists() else 0
    with open(workers_log, "a", encoding="utf-8") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ctx.project.root, env=env)
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            # The workers got the same Ctrl-C (same process group): they save and exit together.
            code = proc.wait()
    if code != 0:
        with open(workers_log, encoding="utf-8", errors="replace") as fh:
            fh.seek(start)
            text = fh.read()  # this launch's output only
        run_name, state = ctx.run.name, ctx.run.trainer_state
        # torchrun reports a worker's 130 as its own failure: recognise the Ctrl-C message instead.
        if code == 130 or "training stopped at step" in text:
            from ftpipe.training.harness import Interrupted

            raise Interrupted(f"training interrupted; checkpoint saved under {ctx.project.rel(state)}/",
                              hint=f"{COMMAND} --run {run_name} --resume-from latest")
        from ftpipe.training.checkpoints import latest_complete_checkpoint

        resumable = latest_complete_checkpoint(state, ctx.project.rel) if ctx.run.trainer_state.is_dir() else None
        then = (f"then {COMMAND} --run {run_name} --resume-from auto (continues from {resumable.name})"
                if resumable else f"then {COMMAND} --run {run_name} --force")
        raise StageError(f"training workers failed (exit {code}): {worker_failure(text)}",
                         hint=f"see {ctx.project.rel(workers_log)}; {then}")
    return launcher


def worker_failure(text: str) -> str:
    """What went wrong in a launcher's output, in one line: a worker's own error line (it names the
    rank and the problem), else torchrun's root cause (which rank died, and how), else the last line."""
    import re

    own = re.findall(r"ftpipe\.training\.worker: (rank \d+: .*)", text)
    if own:
        return own[0]
    cause = text.rpartition("Root Cause (first observed failure):")[2]
    fields = dict(re.findall(r"^\s*(rank|host|exitcode|traceback)\s*:\s*(.*?)\s*$", cause, re.M))
    if "rank" in fields:
        rank = fields["rank"].split(" ")[0]
        how = fields.get("traceback", "")
        if not how or how.startswith("To enable traceback"):
            how = f"exit code {fields.get('exitcode', '?').split(' ')[0]}"
        return f"rank {rank} on {fields.get('host', '?')} failed ({how}); the launcher stopped the other ranks"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def join(ctx: StageContext) -> StageResult:
    """A node with `finetune.node_rank > 0`: take part in the training node 0's command runs.

    Node 0 checks, plans, writes logs/<run>/finetune-sft/train_job.json and then joins the
    rendezvous; this node's workers read that job once all nodes have met (shared storage: the
    project folder at the same path on every node), so both train the same job. Node 0 writes the
    adapter and the one manifest; this node writes only its launcher output (workers-node<R>.log).

    It needs no plan of its own: the job (plan and all) is node 0's.

    Raises:
        ConfigError: accelerate config file missing.
        StageError / Interrupted: as `_launch_workers`.
    """
    ft = ctx.config.finetune
    accelerate = _accelerate_config(ctx.project, ft) if ft.accelerate_config else None
    ctx.log_dir.mkdir(parents=True, exist_ok=True)
    log.info("node %d of %d: joining run %s at %s", ft.node_rank, ft.nnodes, ctx.run.name, ft.rdzv_endpoint)
    device = "cuda" if _cuda() else "cpu"
    launcher = _launch_workers(ctx, device, accelerate)
    metrics: dict[str, Any] = {"node_rank": ft.node_rank, "nodes": ft.nnodes, "launcher": launcher}
    results = ctx.run.trainer_state / RESULTS_FILE
    if results.is_file():
        metrics.update({k: v for k, v in _read_results(results).items() if k in ("global_step", "world_size")})
    return StageResult(metrics=metrics, summary=(
        f"finetune-sft: node {ft.node_rank} of {ft.nnodes} trained in run {ctx.run.name}; node 0 wrote "
        f"{ctx.project.rel(ctx.run.adapter)}/ and the manifest"))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _read_results(path: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise StageError(f"training workers exited without writing {path.name}") from None
