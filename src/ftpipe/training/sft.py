"""The SFT trainer of `finetune-sft`: TRL SFTTrainer + peft on a prepared chat dataset.

The conversations are tokenized here (`tokenize_rows`) with the one assistant mask of
`ftpipe.handoff.measure` (the one eval-sft scores), and TRL gets `input_ids` + `assistant_masks`:
it builds the labels from the mask, so chat templates without `{% generation %}` tags (Llama 3,
Qwen, Phi-3.5, Mistral, Gemma) train on exactly each assistant turn and its end-of-turn token.

`train(job)` hands `sft_recipe(job)` (model, datasets, SFTConfig, how the adapter is saved) to the
shared training loop `ftpipe.training.harness.run_training`, which owns threads, seed, callbacks,
interruption and the atomic publish. It runs in the stage process (one process) or in every worker
started by torchrun / accelerate (`python -m ftpipe.training.worker`), from the same `TrainJob`,
so single- and multi-process runs share one code path. Writes checkpoints and TensorBoard events
under outputs/<run>/trainer_state/ and, on rank 0, the adapter (the full model for
`method: full`) and `ftpipe_train_results.json`.

    ftpipe finetune-sft --config debug_config.yaml
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path
from typing import Any, ClassVar, Mapping

from ftpipe.core.configbase import HandOffFile
from ftpipe.core.errors import InputError
from ftpipe.handoff.measure import encode_conversation, end_of_turn_ids
from ftpipe.handoff.prepared import REDO, read_chat_rows
from ftpipe.training import harness
from ftpipe.training.config import FinetuneConfig
from ftpipe.training.harness import ProgressFn, Trainee, TrainerRecipe
from ftpipe.training.plan import TrainPlan

log = logging.getLogger(__name__)

RESULTS_FILE = "ftpipe_train_results.json"
COMMAND = "ftpipe finetune-sft"


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
    chat_template: str | None = None  # model.chat_template's text, replacing the base's (saved with the adapter)
    chat_template_record: dict[str, str] | None = None  # which template (value or the model's own) and its sha256


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
        warmup_steps=ft.warmup_ratio,  # a float < 1 is read as a ratio of the total steps
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
        report_to="none",  # the harness adds the TensorBoard callback with a fixed folder
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
    """Train, publish the adapter (rank 0) and return the metrics, through the shared harness.

    Args:
        job: what to train and where to write.
        progress: called on rank 0 with {"event": "step"|"log", "step", "max_steps", ...}.
        extra_callbacks: more TrainerCallbacks (bench/train_throughput.py times steps with one).

    Returns:
        Metrics: losses, steps, tokens, tokens/s, trainable parameters, resumed_from, assistant-mask
        counts, eval loss and perplexity.

    Raises:
        Interrupted: SIGINT/SIGTERM stopped training after a checkpoint was saved.
        ConfigError: TRL rejected a setting (e.g. assistant-only loss with an unusable template).
    """
    return harness.run_training(sft_recipe(job), progress, tuple(extra_callbacks or ()))


def sft_recipe(job: TrainJob) -> TrainerRecipe:
    """What SFT brings to the harness: its trainer and data, how the weights are saved, its metrics."""
    ft = job.finetune
    return TrainerRecipe(
        command=COMMAND, run_name=job.run_name, section="finetune",
        settings_hint="check finetune.assistant_only_loss / packing / max_length",
        device=job.plan.device, seed=ft.seed, fuse_lora=ft.method in ("lora", "qlora"),
        output_dir=Path(job.output_dir), final_dir=Path(job.final_dir),
        artifact="model" if ft.method == "full" else "adapter", results_file=RESULTS_FILE,
        resume_from=job.resume_from, base_model_record=job.base_model_record,
        build=functools.partial(_build, job), save=functools.partial(_save, job), finish=_finish,
    )


def _build(job: TrainJob) -> Trainee:
    """Tokenizer, base model, the masked training (and validation) rows and the SFTConfig."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    ft, plan = job.finetune, job.plan
    tokenizer = AutoTokenizer.from_pretrained(job.load_from, **job.model_kwargs)
    if job.chat_template is not None:
        tokenizer.chat_template = job.chat_template  # model.chat_template (checked in the stage's plan)
    model = load_model(job)
    end_ids = end_of_turn_ids(tokenizer, getattr(model, "generation_config", None))
    train_rows, mask_counts = tokenize_rows(tokenizer, read_chat_rows(Path(job.train_file)), end_ids,
                                            ft.assistant_only_loss, "train")
    train_ds = Dataset.from_list(train_rows)
    eval_ds = None
    if job.val_file:
        val_rows, val_counts = tokenize_rows(tokenizer, read_chat_rows(Path(job.val_file)), end_ids,
                                             ft.assistant_only_loss, "val")
        if val_rows:
            eval_ds = Dataset.from_list(val_rows)
        else:  # preprocess.val_fraction 0 (TRL cannot take an empty eval set: StopIteration)
            log.info("%s holds no rows: training without evaluation", Path(job.val_file).name)
        mask_counts.update({f"val_{k}": v for k, v in val_counts.items()})
    trainer_cls = SFTTrainer
    if plan.device == "cpu":
        from ftpipe.training.cpu_fastpath import labelled_loss_trainer, use_document_attention

        if plan.packing and use_document_attention(model):
            log.info("attention: one causal SDPA call per packed document (cpu_fastpath.document_attention)")
        # CUDA keeps TRL's own fused LM head (Triton: labelled positions only).
        trainer_cls = labelled_loss_trainer(SFTTrainer)
    return Trainee(trainer_cls=trainer_cls, model=model, tokenizer=tokenizer,
                   args=sft_config(job, has_eval=eval_ds is not None), train_dataset=train_ds, eval_dataset=eval_ds,
                   peft_config=None if ft.method == "full" else _peft_config(ft), metrics=mask_counts)


def _save(job: TrainJob, trainer, folder: Path) -> None:
    """The adapter (or the full model, with its generation config) into `folder`, on every rank:
    FSDP / ZeRO-3 gather the weights collectively inside `save_model`; only rank 0 writes files."""
    trainer.save_model(str(folder))
    if job.finetune.method == "full" and trainer.is_world_process_zero():
        model = trainer.model
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(folder))


def _finish(trainer, metrics: dict[str, Any], held_out: Mapping[str, Any] | None) -> dict[str, Any]:
    if held_out is not None:
        metrics["eval_perplexity"] = round(math.exp(min(held_out["eval_loss"], 50.0)), 4)
    return metrics
