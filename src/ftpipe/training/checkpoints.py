"""Which Hugging Face Trainer checkpoints under outputs/<run>/trainer_state/ are safe to resume.

HF checkpoints are not written atomically: a crash (or SIGKILL) while `checkpoint-N/` is being
written leaves a folder that looks like a checkpoint but cannot be resumed from. A checkpoint is
used only when it is complete: weights, optimizer, scheduler, RNG state and `trainer_state.json`,
each present and structurally whole (safetensors header + data size, torch zip directory, JSON).
Incomplete ones are skipped with a warning. Used by `finetune-sft --resume-from`:

    ftpipe finetune-sft --run my-run --resume-from latest

Each checkpoint also records the batch it was trained with (`ftpipe_batch.json`: processes,
rows per pass, accumulation): resuming with another number of processes continues exactly when
the rows per optimizer step are the same, and is refused in one line when they are not.
"""

from __future__ import annotations

import json
import logging
import re
import struct
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from ftpipe.core.errors import InputError

log = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "adapter_model.bin", "pytorch_model.bin")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def checkpoint_step(path: Path) -> int | None:
    """The step number of a `checkpoint-N` folder, or None when the name does not match."""
    match = _CHECKPOINT.match(Path(path).name)
    return int(match.group(1)) if match else None


def _safetensors_problem(path: Path) -> str | None:
    # A safetensors file is: 8-byte header length, JSON header, then the tensor data whose last
    # byte is the largest `data_offsets` end. A truncated file is shorter than that.
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                return f"{path.name}: truncated header"
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > size - 8:
                return f"{path.name}: truncated header"
            header = json.loads(fh.read(header_len))
    except (OSError, ValueError) as exc:
        return f"{path.name}: unreadable ({type(exc).__name__})"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end != size:
        return f"{path.name}: {size} bytes, expected {8 + header_len + end} (truncated)"
    return None


def _torch_zip_problem(path: Path) -> str | None:
    # torch.save writes a zip archive; its central directory sits at the end of the file, so a
    # truncated file no longer opens as a zip.
    try:
        with zipfile.ZipFile(path) as zf:
            if not zf.namelist():
                return f"{path.name}: empty archive"
    except (OSError, zipfile.BadZipFile) as exc:
        return f"{path.name}: not a complete torch file ({type(exc).__name__})"
    return None


def _file_problem(path: Path) -> str | None:
    if not path.is_file():
        return f"{path.name}: missing"
    if path.suffix == ".safetensors":
        return _safetensors_problem(path)
    if path.suffix in (".pt", ".pth", ".bin"):
        return _torch_zip_problem(path)
    if path.suffix == ".json":
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            return f"{path.name}: invalid JSON ({type(exc).__name__})"
    return None


def checkpoint_problems(path: Path) -> list[str]:
    """Everything missing or broken in one checkpoint folder (empty list = complete).

    Checks weights (adapter or full model, sharded or not), optimizer, scheduler, RNG state(s)
    and trainer_state.json. Sharded optimizers (FSDP `optimizer_0/`, DeepSpeed `global_step*/`)
    count as present when their folder is non-empty.
    """
    path = Path(path)
    if not path.is_dir():
        return [f"{path}: not a folder"]
    problems: list[str] = []

    weights = [path / n for n in _WEIGHT_FILES if (path / n).exists()]
    index = next((path / n for n in _WEIGHT_INDEXES if (path / n).exists()), None)
    sharded_dirs = [p for p in path.iterdir() if p.is_dir() and (p.name.startswith("pytorch_model_fsdp") or p.name.startswith("global_step"))]
    if index is not None:
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError) as exc:
            problems.append(f"{index.name}: invalid ({type(exc).__name__})")
            shards = []
        problems += [p for s in shards if (p := _file_problem(path / s))]
    elif weights:
        problems += [p for w in weights if (p := _file_problem(w))]
    elif not any(any(d.iterdir()) for d in sharded_dirs):
        problems.append("weights: missing (no adapter_model.safetensors / model.safetensors)")

    optimizer_dirs = [p for p in path.iterdir() if p.is_dir() and (p.name.startswith("optimizer") or p.name.startswith("global_step"))]
    if (path / "optimizer.pt").exists() or not optimizer_dirs:
        if (problem := _file_problem(path / "optimizer.pt")):
            problems.append(problem)
    elif not any(any(d.iterdir()) for d in optimizer_dirs):
        problems.append("optimizer: empty folder")

    if (problem := _file_problem(path / "scheduler.pt")):
        problems.append(problem)

    rng = sorted(path.glob("rng_state*.pth"))
    if not rng:
        problems.append("rng_state.pth: missing")
    problems += [p for r in rng if (p := _file_problem(r))]

    state_file = path / "trainer_state.json"
    problem = _file_problem(state_file)
    if problem:
        problems.append(problem)
    else:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        step = checkpoint_step(path)
        if not isinstance(state, dict) or (step is not None and state.get("global_step") != step):
            problems.append(f"trainer_state.json: global_step {state.get('global_step') if isinstance(state, dict) else '?'} does not match {path.name}")
    return problems


def list_checkpoints(folder: Path) -> list[Path]:
    """All `checkpoint-N` folders under `folder`, oldest step first (complete or not)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=lambda p: checkpoint_step(p))


def clear_for_fresh_start(ctx, folder: Path, events: Path, command: str, what: str = "checkpoints") -> None:
    """Start a training over in `folder`: remove its checkpoints and the TensorBoard `events` folder,
    refusing to drop the work of an interrupted run.

    Args:
        ctx: the stage context (its previous manifest, `--force`, `--resume-from`).
        command: the stage's command, for the hint (`ftpipe finetune-sft`).
        what: how the refusal names the checkpoints ("checkpoints", "DPO checkpoints").

    Raises:
        InputError: checkpoints of an unfinished training, without --force or --resume-from auto.
    """
    import shutil

    checkpoints = list_checkpoints(folder)
    previous = ctx.previous_manifest  # before this attempt: ours already says `running`
    interrupted = previous is not None and previous.get("status") in ("running", "failed")
    # `--resume-from auto` found no complete checkpoint (a kill before or while the first one was
    # written): starting over is what it asks for, and the incomplete folders hold nothing usable.
    fresh_asked = ctx.options.get("resume_from") == "auto"
    if checkpoints and interrupted and not ctx.force and not fresh_asked:
        raise InputError(
            f"run {ctx.run.name} has {what} from an unfinished training "
            f"({', '.join(p.name for p in checkpoints)})",
            hint=f"{command} --run {ctx.run.name} --resume-from latest (or --force to start over)",
        )
    for path in [*checkpoints, events]:
        if path.exists():
            log.warning("starting over: removing %s", ctx.project.rel(path))
            shutil.rmtree(path)


def latest_complete_checkpoint(folder: Path, project_rel=str) -> Path | None:
    """The newest complete checkpoint under `folder`; incomplete newer ones are skipped with a warning."""
    for path in reversed(list_checkpoints(folder)):
        problems = checkpoint_problems(path)
        if not problems:
            return path
        log.warning("skipping incomplete checkpoint %s: %s", project_rel(path), "; ".join(problems))
    return None


def resolve_resume(option: str | None, folder: Path, project_rel=str, command: str = "ftpipe finetune-sft") -> Path | None:
    """Turn `--resume-from` into the checkpoint folder to resume from.

    Args:
        option: None (start fresh), `latest` (newest complete checkpoint, required), `auto`
            (newest complete checkpoint if any, else fresh) or a checkpoint folder path.
        folder: the run's trainer_state/ folder.
        project_rel: formats paths for messages (relative to the project root).
        command: the training command, for the hint (finetune-sft or finetune-dpo).

    Returns:
        The checkpoint folder, or None to start from scratch.

    Raises:
        InputError: `latest` with no complete checkpoint; a given checkpoint that is incomplete.
    """
    if option is None:
        return None
    if option in ("latest", "auto"):
        found = latest_complete_checkpoint(folder, project_rel)
        if found is None and option == "latest":
            raise InputError(
                f"--resume-from latest: no complete checkpoint under {project_rel(folder)}/",
                hint=f"start over with `{command} --force`, or use --resume-from auto",
            )
        if found is None:
            log.info("--resume-from auto: no complete checkpoint under %s; starting from scratch", project_rel(folder))
        return found
    path = Path(option)
    if not path.is_absolute() and not path.exists() and (folder / option).exists():
        path = folder / option  # `--resume-from checkpoint-20` names a folder of this run
    problems = checkpoint_problems(path)
    if problems:
        raise InputError(
            f"--resume-from {option}: incomplete checkpoint ({'; '.join(problems)})",
            hint="--resume-from latest (the newest complete checkpoint)",
        )
    return path.resolve()


BATCH_FILE = "ftpipe_batch.json"


@dataclass(frozen=True)
class BatchShape:
    """How the rows of one optimizer step are split: processes x rows per pass x accumulation."""

    world_size: int
    micro_batch: int  # rows per forward/backward pass on one process
    grad_accum: int  # passes per optimizer step

    @property
    def rows(self) -> int:
        return self.world_size * self.micro_batch * self.grad_accum

    def __str__(self) -> str:
        processes = "process" if self.world_size == 1 else "processes"
        return f"{self.world_size} {processes} x {self.micro_batch} rows x {self.grad_accum} accumulation = {self.rows} rows per step"


def write_batch_record(checkpoint: Path, shape: BatchShape) -> None:
    """Record in a checkpoint the batch shape it was trained with (rank 0, after the checkpoint is saved)."""
    from ftpipe.core.fsutil import atomic_write_json

    atomic_write_json(Path(checkpoint) / BATCH_FILE, asdict(shape))


def batch_record(checkpoint: Path, grad_accum: int) -> BatchShape | None:
    """The batch shape a checkpoint was trained with.

    From its `ftpipe_batch.json`; for a checkpoint without one (a kill between the save and the
    record), from HF's own files: one `rng_state_<rank>.pth` per process and `train_batch_size`
    (rows per pass) in trainer_state.json, with `grad_accum` assumed unchanged. None if unreadable.
    """
    checkpoint = Path(checkpoint)
    try:
        return BatchShape(**json.loads((checkpoint / BATCH_FILE).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        pass
    try:
        micro = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))["train_batch_size"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    ranks = len(list(checkpoint.glob("rng_state_*.pth"))) or 1
    return BatchShape(ranks, int(micro), grad_accum) if isinstance(micro, int) else None


def _sharded_optimizer(checkpoint: Path) -> bool:
    return any(p.is_dir() and (p.name.startswith("optimizer") or p.name.startswith("global_step") or
                               p.name.startswith("pytorch_model_fsdp")) for p in Path(checkpoint).iterdir())


def check_resume_batch(checkpoint: Path, now: BatchShape, grad_accum: int, project_rel=str) -> None:
    """Allow a resume only where the optimizer steps and the data order continue as before.

    `grad_accum` is the config's `finetune.grad_accum` (to suggest a `batch_size` that fits).

    Hugging Face's Trainer skips `global_step x accumulation` batches of each process's shard on
    resume; the shards interleave the same seeded permutation, so the rows of every later step are
    those of an uninterrupted run whenever the rows per step are unchanged, whatever the number of
    processes. A different number of rows per step would change what every later step sees (and an
    epoch's length); a sharded optimizer state (FSDP, ZeRO) belongs to its number of processes.

    Raises:
        InputError: the rows per step differ, or a sharded checkpoint meets another world size.
    """
    was = batch_record(checkpoint, now.grad_accum)
    name = Path(checkpoint).name
    if was is None or was == now:
        return
    if was.world_size != now.world_size and _sharded_optimizer(checkpoint):
        raise InputError(
            f"--resume-from: {project_rel(Path(checkpoint))} holds an optimizer sharded over {was.world_size} "
            f"processes (FSDP / ZeRO); this launch has {now.world_size}",
            hint=f"resume with {was.world_size} processes in all (--num-processes / --nnodes)",
        )
    if was.rows != now.rows:
        per_process = was.rows // (now.world_size * grad_accum) if was.rows % (now.world_size * grad_accum) == 0 else None
        processes = "process" if now.world_size == 1 else "processes"
        fix = (f"--set finetune.batch_size={per_process} keeps {was.rows} rows per step with {now.world_size} {processes}"
               if per_process else f"resume with {was.world_size} processes")
        raise InputError(
            f"--resume-from: {name} was trained with {was}; this launch would take {now}: later steps would see "
            "other rows than the interrupted run",
            hint=f"{fix} (or --force to start over)",
        )
    log.info("resuming %s, trained with %s, with %s: same rows per step, so the step count and the data order "
             "continue (dropout masks differ: per-process random states do not carry over)", name, was, now)
