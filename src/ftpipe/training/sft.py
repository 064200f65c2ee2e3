"""The training body of `finetune-sft`: TRL SFTTrainer + peft on a prepared chat dataset.

The conversations are tokenized here (`tokenize_rows`) with the one assistant mask of
`ftpipe.handoff.measure` (the one eval-sft scores), and TRL gets `input_ids` + `assistant_masks`:
it builds the labels from the mask, so chat templates without `{% generation %}` tags (Llama 3,
Qwen, Phi-3.5, Mistral, Gemma) train on exactly each assistant turn and its end-of-turn token.

Runs in the stage process (one process) or in every worker started by torchrun / accelerate
(`python -m ftpipe.training.worker`), from the same `TrainJob`, so single- and multi-process runs
share one code path. Writes checkpoints and TensorBoard events under outputs/<run>/trainer_state/
and, on rank 0, the adapter (the full model for `method: full`) and `ftpipe_train_results.json`.

    ftpipe finetune-sft --config debug_config.yaml
"""

from __future__ import annotations

import logging
import math
import signal
import time
from pathlib import Path
from typing import Any, Callable, ClassVar


from ftpipe.core.configbase import HandOffFile
from ftpipe.core.errors import ConfigError, InputError, StageError
from ftpipe.core.fsutil import atomic_write_json
from ftpipe.handoff.base_model import write_base_model
from ftpipe.handoff.measure import encode_conversation, end_of_turn_ids
from ftpipe.handoff.prepared import REDO, read_chat_rows
from ftpipe.training.checkpoints import BatchShape, write_batch_record
from ftpipe.training.config import FinetuneConfig
from ftpipe.training.plan import TrainPlan

log = logging.getLogger(__name__)

RESULTS_FILE = "ftpipe_train_results.json"
TENSORBOARD_DIR = "tensorboard"

ProgressFn = Callable[[dict[str, Any]], None]


class Interrupted(StageError):
    """Training stopped by Ctrl-C (SIGINT) / SIGTERM after saving a checkpoint (exit 130)."""

    exit_code = 130


class AlreadyTrained(Exception):
    """Raised from `on_train_begin`: the checkpoint resumed from is already at the last step."""


class TrainJob(HandOffFile):
    """Everything one training process needs, typed; written as JSON for the multi-process workers."""

    what: ClassVar[str] = "training job"
    writer: ClassVar[str] = "`ftpipe finetune-sft`"

    finetune: FinetuneConfig  # the `finetune` config section
    plan: TrainPlan
    load_from: str  # base model folder or hub id
    model_kwargs: dict[str, Any]  # revision / trust_remote_code for from_pretrained
    base_model_record: dict[str, Any]  # {"id", "revision", "path"} -> ftpipe_base_model.json
    train_file: str
    val_file: str | None
    output_dir: str  # outputs/<run>/trainer_state
    final_dir: str  # outputs/<run>/adapter (the full model for method=full)
    resume_from: str | None
    run_name: str


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


def _peft_config(ft: FinetuneConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=ft.lora_r,
        lora_alpha=ft.lora_alpha,
        lora_dropout=ft.lora_dropout,
        target_modules=ft.target_modules,
        use_dora=ft.method == "dora",
        task_type="CAUSAL_LM",
    )


def load_model(job: TrainJob):
    """The base model in the planned dtype (4-bit for QLoRA)."""
    import torch
    from transformers import AutoModelForCausalLM

    base_dtype = job.plan.base_dtype
    kwargs: dict[str, Any] = dict(job.model_kwargs)
    if base_dtype == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
        kwargs["dtype"] = torch.bfloat16
    else:
        kwargs["dtype"] = getattr(torch, base_dtype)
    return AutoModelForCausalLM.from_pretrained(job.load_from, **kwargs)


def sft_config(job: TrainJob, has_eval: bool):
    """The TRL SFTConfig for this job (one place, so the bench measures the same settings)."""
    from trl import SFTConfig

    ft, plan = job.finetune, job.plan
    eval_steps = ft.eval_steps if has_eval else None
    return SFTConfig(
        output_dir=job.output_dir,
        max_length=ft.max_length,
        packing=plan.packing,
        # ftpipe tokenizes and masks the conversations itself (tokenize_rows): TRL builds the labels
        # from the `assistant_masks` column and never needs a template with generation tags.
        assistant_only_loss=False,
        num_train_epochs=ft.epochs,
        max_steps=ft.max_steps,
        # The plan may split the batch into micro-batches (same rows per optimizer step, see plan.py).
        per_device_train_batch_size=_micro_batch_size(job),
        per_device_eval_batch_size=ft.batch_size,
        gradient_accumulation_steps=plan.grad_accum,
        learning_rate=ft.learning_rate,
        lr_scheduler_type=ft.lr_scheduler,
        warmup_steps=ft.warmup_ratio,  # transformers 5: a float < 1 is a ratio of the total steps
        logging_steps=ft.logging_steps,
        save_strategy="steps",
        save_steps=ft.save_steps,
        save_total_limit=ft.save_total_limit,
        eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps,
        seed=ft.seed,
        data_seed=ft.seed,
        bf16=plan.precision == "bf16",
        fp16=plan.precision == "fp16",
        use_cpu=plan.device == "cpu",
        gradient_checkpointing=plan.gradient_checkpointing,
        include_num_input_tokens_seen="non_padding",
        report_to="none",  # the TensorBoard callback is added with a fixed folder (see train())
        disable_tqdm=True,  # library code never prints; progress goes to run.log and the CLI bar
        dataloader_num_workers=0,
        save_only_model=False,
        model_init_kwargs=None,
        dataset_num_proc=None,
        ddp_find_unused_parameters=False,
    )


def tokenize_rows(tokenizer, rows: list[dict[str, Any]], end_ids: set[int], assistant_only: bool,
                  where: str = "train") -> tuple[list[dict[str, list[int]]], dict[str, int]]:
    """TRL's pre-tokenized rows: `input_ids`, plus `assistant_masks` for assistant-only loss.

    A row with no assistant token to learn (every turn unlocated, see `encode_conversation`) is
    left out; such rows and unlocated turns are logged and counted (the stage metrics).

    Returns:
        (rows, counts): counts has `assistant_turns`, `assistant_turns_unlocated`,
        `rows_without_target`, `target_tokens`.
    """
    out: list[dict[str, list[int]]] = []
    counts = {"assistant_turns": 0, "assistant_turns_unlocated": 0, "rows_without_target": 0, "target_tokens": 0}
    for row in rows:
        e = encode_conversation(tokenizer, row["messages"], tools=row.get("tools"), end_ids=end_ids)
        counts["assistant_turns"] += e.turns
        counts["assistant_turns_unlocated"] += e.unlocated
        if not assistant_only:
            out.append({"input_ids": e.input_ids})
            counts["target_tokens"] += len(e.input_ids)
            continue
        if not any(e.mask):
            counts["rows_without_target"] += 1
            continue
        counts["target_tokens"] += sum(e.mask)
        out.append({"input_ids": e.input_ids, "assistant_masks": e.mask})
    if counts["assistant_turns_unlocated"] or counts["rows_without_target"]:
        log.warning("%s: %d of %d assistant turns could not be located in the rendered conversation; %d rows "
                    "without any assistant token left out", where, counts["assistant_turns_unlocated"],
                    counts["assistant_turns"], counts["rows_without_target"])
    if rows and not out:
        raise InputError(f"{where}: no row has an assistant turn to learn ({len(rows)} rows)",
                         hint=f"check the chat template and the assistant turns, then {REDO}")
    return out, counts


def _micro_batch_size(job: TrainJob) -> int:
    """Rows per forward/backward pass: the plan's micro-batch (0 in the plan: the whole batch)."""
    return job.plan.micro_batch_size or job.finetune.batch_size


def train(job: TrainJob, progress: ProgressFn | None = None, extra_callbacks: list | None = None) -> dict[str, Any]:
    """Train, save the adapter (rank 0) and return the metrics.

    Args:
        job: what to train and where to write.
        progress: called on rank 0 with {"event": "step"|"log", "step", "max_steps", ...}.
        extra_callbacks: more TrainerCallbacks (bench/train_throughput.py times steps with one).

    Returns:
        Metrics: losses, steps, tokens, tokens/s, trainable parameters, resumed_from.

    Raises:
        Interrupted: SIGINT/SIGTERM stopped training after a checkpoint was saved.
        ConfigError: TRL rejected a setting (e.g. assistant-only loss with an unusable template).
    """
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, set_seed
    from transformers.integrations import TensorBoardCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import SFTTrainer

    ft, plan = job.finetune, job.plan
    if plan.device == "cpu":
        from ftpipe.training.plan import thread_count

        # Under torchrun each rank gets its share of the cores (the launcher sets OMP_NUM_THREADS).
        torch.set_num_threads(thread_count())
        from ftpipe.training.cpu_fastpath import fuse_lora_linear, return_freed_memory_to_os

        return_freed_memory_to_os()
        if ft.method in ("lora", "qlora"):
            fuse_lora_linear()
    set_seed(ft.seed)
    tokenizer = AutoTokenizer.from_pretrained(job.load_from, **job.model_kwargs)
    model = load_model(job)
    end_ids = end_of_turn_ids(tokenizer, getattr(model, "generation_config", None))
    train_rows, mask_counts = tokenize_rows(tokenizer, read_chat_rows(Path(job.train_file)), end_ids,
                                            ft.assistant_only_loss, "train")
    train_ds = Dataset.from_list(train_rows)
    eval_ds = None
    if job.val_file:
        val_rows, val_counts = tokenize_rows(tokenizer, read_chat_rows(Path(job.val_file)), end_ids,
                                             ft.assistant_only_loss, "val")
        eval_ds = Dataset.from_list(val_rows)
        mask_counts.update({f"val_{k}": v for k, v in val_counts.items()})
    if plan.device == "cpu" and plan.packing:
        from ftpipe.training.cpu_fastpath import use_document_attention

        if use_document_attention(model):
            log.info("attention: one causal SDPA call per packed document (cpu_fastpath.document_attention)")
    peft_config = None if ft.method == "full" else _peft_config(ft)

    stop = StopFlag()
    callback = make_callback(stop, progress)
    tensorboard = TensorBoardCallback()
    tensorboard.logging_dir = str(Path(job.output_dir) / TENSORBOARD_DIR)  # stable folder per run
    args = sft_config(job, has_eval=eval_ds is not None)
    trainer_cls = SFTTrainer
    if plan.device == "cpu":  # CUDA keeps TRL's own fused LM head (Triton: labelled positions only)
        from ftpipe.training.cpu_fastpath import labelled_loss_trainer

        trainer_cls = labelled_loss_trainer(SFTTrainer)
    try:
        trainer = trainer_cls(
            model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
            processing_class=tokenizer, peft_config=peft_config, callbacks=[callback, tensorboard, *(extra_callbacks or [])],
        )
    except ValueError as exc:
        raise ConfigError(f"finetune: TRL rejected the settings: {exc}".splitlines()[0],
                          hint="check finetune.assistant_only_loss / packing / max_length") from None
    for noisy in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(noisy)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    if trainer.is_world_process_zero():
        log.info("trainable parameters: %d of %d (%.2f%%)", trainable, total, 100 * trainable / max(total, 1))

    started = time.monotonic()
    with stop:
        try:
            train_loss = float(trainer.train(resume_from_checkpoint=job.resume_from).training_loss)
        except AlreadyTrained:
            train_loss = finished_checkpoint(trainer.state, callback, Path(job.resume_from).name)
    state = trainer.state
    if callback.interrupted_at is not None:
        saved = Path(job.output_dir) / f"checkpoint-{state.global_step}"
        raise Interrupted(
            f"{stop.signal_name or 'stop signal'}: training stopped at step {state.global_step}/{state.max_steps}; "
            f"checkpoint saved in {saved.name}/",
            hint=f"ftpipe finetune-sft --run {job.run_name} --resume-from latest",
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
        "resumed_from": Path(job.resume_from).name if job.resume_from else None,
        **mask_counts,
    }
    if eval_ds is not None:
        eval_metrics = trainer.evaluate()
        metrics["eval_loss"] = round(float(eval_metrics["eval_loss"]), 6)
        metrics["eval_perplexity"] = round(math.exp(min(eval_metrics["eval_loss"], 50.0)), 4)

    save_final(trainer, tokenizer, job)
    if trainer.is_world_process_zero():
        atomic_write_json(Path(job.output_dir) / RESULTS_FILE, metrics)
    _barrier()
    return metrics


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


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_final(trainer, tokenizer, job: TrainJob) -> None:
    """Write the adapter (or full model), tokenizer, chat template and base model reference.

    Called on every rank: FSDP / ZeRO-3 gather the weights collectively inside `save_model`;
    only rank 0 writes files.
    """
    import shutil

    final = Path(job.final_dir)
    if trainer.is_world_process_zero():
        if final.exists():
            shutil.rmtree(final)  # a rerun (--force) must not leave stale shards behind
        final.mkdir(parents=True)
    _barrier()
    trainer.save_model(str(final))
    if not trainer.is_world_process_zero():
        return
    tokenizer.save_pretrained(str(final))
    # Trainer.save_model pickles its arguments there; the published adapter is safetensors only.
    (final / "training_args.bin").unlink(missing_ok=True)
    template = final / "chat_template.jinja"
    if not template.exists() and isinstance(tokenizer.chat_template, str):
        template.write_text(tokenizer.chat_template, encoding="utf-8")
    if job.finetune.method == "full":
        model = trainer.model
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(final))
    write_base_model(final, job.base_model_record)
    log.info("saved %s to %s", "model" if job.finetune.method == "full" else "adapter", final)
