"""The one training loop of `finetune-sft` and `finetune-dpo`: what every trainer goes through.

`run_training(recipe)` owns what both trainers share, in this order: torch's threads and the CPU
memory setting, the seed, the callbacks (progress lines and the CLI's bar, save-on-Ctrl-C,
TensorBoard in a fixed folder), turning a setting TRL rejects into one line, a resume from a
checkpoint that is already at the last step, the interrupted run (exit 130, with the resume
command), the final evaluation, the atomic publish of the artifact (written to a temp folder,
renamed into place when complete) and the results file. A `TrainerRecipe` brings only what
differs between trainers: how to build the trainer and its data (`build`), how to write the
weights (`save`), its checks and metrics (`ready`, `finish`). SFT's recipe is in `sft.py` (run
in-process or by every worker of a multi-process run), DPO's in `finetune_dpo.py`.

    ftpipe finetune-sft --config debug_config.yaml
    ftpipe finetune-dpo --config debug_config.yaml --run demo
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from ftpipe.core.errors import ConfigError, StageError
from ftpipe.training.checkpoints import BatchShape, write_batch_record

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"  # <output_dir>/tensorboard/: one stable events folder per run

ProgressFn = Callable[[dict[str, Any]], None]


class Interrupted(StageError):
    """Training stopped by Ctrl-C (SIGINT) / SIGTERM after saving a checkpoint (exit 130)."""

    exit_code = 130


class AlreadyTrained(Exception):
    """Raised from `on_train_begin`: the checkpoint resumed from is already at the last step."""


@dataclass(frozen=True)
class Trainee:
    """What a recipe's `build` returns: the trainer class and everything it is constructed with."""

    trainer_cls: type
    model: Any
    tokenizer: Any  # also published next to the weights
    args: Any  # the TRL config (SFTConfig, DPOConfig)
    train_dataset: Any
    eval_dataset: Any = None  # scored once after training when given
    peft_config: Any = None
    callbacks: tuple[Any, ...] = ()  # the trainer's own, after the harness's
    metrics: Mapping[str, Any] = field(default_factory=dict)  # known before training (rows, masks)


@dataclass(frozen=True)
class TrainerRecipe:
    """What one trainer brings to `run_training`; everything else is the harness's."""

    command: str  # `ftpipe finetune-sft`: the resume hint of an interrupted run
    run_name: str
    section: str  # the config section a setting TRL rejects belongs to ("finetune", "dpo")
    settings_hint: str  # what to check when TRL rejects a setting
    device: str  # cpu | cuda
    seed: int
    fuse_lora: bool  # on the CPU, peft's LoRA forward fused (cpu_fastpath.fuse_lora_linear)
    output_dir: Path  # checkpoints, tensorboard/ and the results file
    final_dir: Path  # the published artifact
    artifact: str  # how the log names it ("adapter", "model", "DPO adapter")
    results_file: str  # <output_dir>/<results_file>: the metrics, written by rank 0 last
    resume_from: str | None  # a complete checkpoint folder, or None to start fresh
    base_model_record: Mapping[str, Any]  # -> <final_dir>/ftpipe_base_model.json
    build: Callable[[], Trainee]  # tokenizer, model, datasets, TRL config: after threads and seed
    save: Callable[[Any, Path], None]  # (trainer, folder): the weights, on every rank
    ready: Callable[[Any], None] | None = None  # (trainer): checks and log lines once it exists
    finish: Callable[[Any, dict[str, Any], Mapping[str, Any] | None], dict[str, Any]] | None = None
    # finish(trainer, metrics, held-out scores or None) -> the trainer's metrics


class StopFlag:
    """Set by SIGINT/SIGTERM; a second Ctrl-C raises KeyboardInterrupt at once."""

    def __init__(self) -> None:
        self.stop = False
        self.signal_name = ""
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, _frame) -> None:
        if self.stop and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.stop = True
        self.signal_name = signal.Signals(signum).name
        log.warning("%s received: saving a checkpoint at the end of this step (Ctrl-C again to abort now)", self.signal_name)

    def __enter__(self) -> "StopFlag":
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def make_callback(stop: StopFlag, progress: ProgressFn | None):
    from transformers import TrainerCallback

    class FtpipeCallback(TrainerCallback):
        """Progress lines in run.log (and to the CLI's bar), and the save-on-Ctrl-C switch."""

        def __init__(self) -> None:
            self.start_time = 0.0
            self.start_tokens = 0
            self.start_step = 0
            self.last_time = 0.0
            self.last_tokens = 0
            self.tokens_per_s = 0.0
            self.first_loss: float | None = None
            self.last_loss: float | None = None
            self.interrupted_at: int | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.start_time = self.last_time = time.monotonic()
            self.start_tokens = self.last_tokens = state.num_input_tokens_seen
            self.start_step = state.global_step
            if state.global_step > 0 and state.global_step >= state.max_steps:
                # Resumed from the last checkpoint (killed after it, before the stage completed).
                # HF Trainer would run one more step (global_step = max_steps + 1): stop here,
                # with the checkpoint's weights and state already loaded.
                raise AlreadyTrained()
            if state.is_world_process_zero:
                log.info("training: step %d -> %d (%d processes)", state.global_step, state.max_steps, args.world_size)
            loader = kwargs.get("train_dataloader")
            if args.world_size > 1 and loader is not None:  # every rank: the shard it reads
                log.info("rank %d of %d: %d batches of %d sequences per epoch, its shard of the %d training sequences",
                         args.process_index, args.world_size, len(loader), args.per_device_train_batch_size,
                         len(loader.dataset))

        def _eta(self, state) -> float | None:
            done = state.global_step - self.start_step
            if done <= 0:
                return None
            return (time.monotonic() - self.start_time) / done * (state.max_steps - state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            if stop_requested(stop.stop) and self.interrupted_at is None:
                self.interrupted_at = state.global_step
                control.should_save = True
                control.should_training_stop = True
            if progress is not None and state.is_world_process_zero:
                progress({"event": "step", "step": state.global_step, "max_steps": state.max_steps,
                          "loss": self.last_loss, "tokens_per_s": self.tokens_per_s, "eta_s": self._eta(state)})
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            now = time.monotonic()
            tokens = state.num_input_tokens_seen
            if now > self.last_time and tokens > self.last_tokens:
                self.tokens_per_s = (tokens - self.last_tokens) / (now - self.last_time)
            self.last_time, self.last_tokens = now, tokens
            if "loss" in logs:
                self.last_loss = float(logs["loss"])
                if self.first_loss is None:
                    self.first_loss = self.last_loss
                eta = self._eta(state)
                log.info(
                    "step %d/%d loss %.4f lr %.3g tokens %d tokens/s %.0f eta %s",
                    state.global_step, state.max_steps, logs["loss"], logs.get("learning_rate", float("nan")),
                    tokens, self.tokens_per_s, "?" if eta is None else f"{eta:.0f}s",
                )
            if "eval_loss" in logs:
                log.info("step %d eval_loss %.4f", state.global_step, logs["eval_loss"])
            if progress is not None:
                progress({"event": "log", "step": state.global_step, "max_steps": state.max_steps, **logs})

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if checkpoint.is_dir():
                    write_batch_record(checkpoint, BatchShape(args.world_size, args.per_device_train_batch_size,
                                                              args.gradient_accumulation_steps))
                log.info("checkpoint saved: checkpoint-%d", state.global_step)

        def session_tokens_per_s(self, state) -> float:
            elapsed = time.monotonic() - self.start_time
            return (state.num_input_tokens_seen - self.start_tokens) / elapsed if elapsed > 0 else 0.0

    return FtpipeCallback()


def stop_requested(stop_flag: bool) -> bool:
    """The stop flag agreed across ranks (any rank interrupted -> all save and stop together)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return stop_flag
    flag = torch.tensor([1 if stop_flag else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def finished_checkpoint(state, callback, checkpoint: str) -> float:
    """Metrics of a run resumed from its last checkpoint, taken from that checkpoint's log history.

    The first / last logged losses and the mean training loss are those of the whole run, as an
    uninterrupted run reports them; nothing is trained, so no new checkpoint or log entry is written.
    """
    log.info("%s is already at the last step (%d/%d): publishing it without training",
             checkpoint, state.global_step, state.max_steps)
    logged = [(h["step"], float(h["loss"])) for h in state.log_history if "loss" in h]
    if logged:
        callback.first_loss, callback.last_loss = logged[0][1], logged[-1][1]
    # Each logged loss is the mean over the steps since the previous log: weight it by them.
    total, previous = 0.0, 0
    for step, loss in logged:
        total, previous = total + loss * (step - previous), step
    return total / previous if previous else 0.0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _set_up_process(recipe: TrainerRecipe) -> None:
    """Threads, the CPU memory setting and the fused LoRA forward (CPU), then the seed."""
    import torch
    from transformers import set_seed

    if recipe.device == "cpu":
        from ftpipe.training import cpu_fastpath
        from ftpipe.training.plan import thread_count

        # Under torchrun each rank gets its share of the cores (the launcher sets OMP_NUM_THREADS).
        torch.set_num_threads(thread_count())
        cpu_fastpath.return_freed_memory_to_os()
        if recipe.fuse_lora:
            # Uses the active adapter: DPO's frozen "ref" for its reference pass; disabled adapters
            # (the base as reference) take peft's own path.
            cpu_fastpath.fuse_lora_linear()
    set_seed(recipe.seed)


def run_training(recipe: TrainerRecipe, progress: ProgressFn | None = None,
                 extra_callbacks: tuple[Any, ...] | list[Any] = ()) -> dict[str, Any]:
    """Build, train, evaluate and publish one trainer; returns its metrics (the same on every rank).

    Args:
        recipe: what the trainer brings (see `TrainerRecipe`).
        progress: called on rank 0 with {"event": "step"|"log", "step", "max_steps", ...}.
        extra_callbacks: more TrainerCallbacks (bench/train_throughput.py times steps with one).

    Returns:
        Metrics: losses, steps, tokens, tokens/s, parameters, resumed_from, eval_loss (with held-out
        data) and whatever the recipe's `finish` adds.

    Raises:
        Interrupted: SIGINT/SIGTERM stopped training after a checkpoint was saved (exit 130).
        ConfigError: TRL rejected a setting (names the recipe's config section).
    """
    from transformers.integrations import TensorBoardCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    _set_up_process(recipe)
    trainee = recipe.build()
    stop = StopFlag()
    callback = make_callback(stop, progress)
    tensorboard = TensorBoardCallback()
    tensorboard.logging_dir = str(recipe.output_dir / TENSORBOARD_DIR)  # stable folder per run
    try:
        trainer = trainee.trainer_cls(
            model=trainee.model, args=trainee.args, train_dataset=trainee.train_dataset,
            eval_dataset=trainee.eval_dataset, processing_class=trainee.tokenizer, peft_config=trainee.peft_config,
            callbacks=[callback, tensorboard, *trainee.callbacks, *extra_callbacks],
        )
    except ValueError as exc:
        raise ConfigError(f"{recipe.section}: TRL rejected the settings: {exc}".splitlines()[0],
                          hint=recipe.settings_hint) from None
    for noisy in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(noisy)
    if recipe.ready is not None:
        recipe.ready(trainer)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    if trainer.is_world_process_zero():
        log.info("trainable parameters: %d of %d (%.2f%%)", trainable, total, 100 * trainable / max(total, 1))

    started = time.monotonic()
    with stop:
        try:
            train_loss = float(trainer.train(resume_from_checkpoint=recipe.resume_from).training_loss)
        except AlreadyTrained:
            train_loss = finished_checkpoint(trainer.state, callback, Path(recipe.resume_from).name)
    state = trainer.state
    if callback.interrupted_at is not None:
        raise Interrupted(
            f"{stop.signal_name or 'stop signal'}: training stopped at step {state.global_step}/{state.max_steps}; "
            f"checkpoint saved in checkpoint-{state.global_step}/",
            hint=f"{recipe.command} --run {recipe.run_name} --resume-from latest",
        )
    train_seconds = time.monotonic() - started

    metrics: dict[str, Any] = {
        "train_loss": round(train_loss, 6),
        "first_logged_loss": callback.first_loss,
        "last_logged_loss": callback.last_loss,
        "global_step": state.global_step,
        "max_steps": state.max_steps,
        "epochs": round(float(state.epoch or 0.0), 4),
        "tokens_seen": int(state.num_input_tokens_seen),
        "tokens_per_s": round(callback.session_tokens_per_s(state), 2),
        "train_seconds": round(train_seconds, 2),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "world_size": trainer.args.world_size,
        "resumed_from": Path(recipe.resume_from).name if recipe.resume_from else None,
        **trainee.metrics,
    }
    held_out = None
    if trainee.eval_dataset is not None:
        held_out = trainer.evaluate()
        metrics["eval_loss"] = round(float(held_out["eval_loss"]), 6)
    if recipe.finish is not None:
        metrics = recipe.finish(trainer, metrics, held_out)

    publish(trainer, trainee.tokenizer, recipe)
    if trainer.is_world_process_zero():
        from ftpipe.core.fsutil import atomic_write_json

        atomic_write_json(recipe.output_dir / recipe.results_file, metrics)
    barrier()
    return metrics


def publish(trainer, tokenizer, recipe: TrainerRecipe) -> None:
    """Write the artifact to `.<name>.tmp` next to `recipe.final_dir`, then rename it into place.

    The weights are written by `recipe.save` on every rank (FSDP / ZeRO-3 gather them collectively);
    rank 0 adds the tokenizer, the chat template and the base model reference and renames. A crash
    leaves the previous artifact (or none) and the temp folder, never a half-written artifact.
    """
    from ftpipe.handoff.base_model import write_base_model

    final = recipe.final_dir
    tmp = final.with_name(f".{final.name}.tmp")
    main = trainer.is_world_process_zero()
    if main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    recipe.save(trainer, tmp)
    if main:
        tokenizer.save_pretrained(str(tmp))
        # Trainer.save_model pickles its arguments there; the published artifact is safetensors only.
        (tmp / "training_args.bin").unlink(missing_ok=True)
        template = tmp / "chat_template.jinja"
        if not template.exists() and isinstance(tokenizer.chat_template, str):
            template.write_text(tokenizer.chat_template, encoding="utf-8")
        write_base_model(tmp, dict(recipe.base_model_record))
        _replace_dir(tmp, final)
        log.info("saved the %s to %s", recipe.artifact, final)
    barrier()


def _replace_dir(tmp: Path, final: Path) -> None:
    """Put the complete folder `tmp` at `final` (a rerun's `--force` leaves no stale file behind)."""
    if not final.exists():
        os.replace(tmp, final)
        return
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old)
