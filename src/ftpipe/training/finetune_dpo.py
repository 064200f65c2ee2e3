"""Stage `finetune-dpo`: preference tuning (DPO) with TRL's DPOTrainer on prepared/<preference.name>/.

After `finetune-sft` (and `preprocess-dpo`, which writes the pairs), before eval / serve. Reads the
prepared pairs through `ftpipe.handoff.pairs`, trains a LoRA adapter with DPO in this process and
writes outputs/<run>/dpo_adapter/ (checkpoints and TensorBoard events in outputs/<run>/dpo_trainer_state/).

The reference model is never a second copy of the model in memory:
- `dpo.init: sft` (default): the run's SFT adapter is loaded as the trainable adapter "default";
  TRL adds a frozen copy named "ref" and computes the reference log-probs through it. The result
  is a LoRA adapter on the raw base (as the SFT adapter is), so a server can load both side by side.
- `dpo.init: base`: a new LoRA on the base model; the reference is the base, adapter disabled.

    ftpipe finetune-dpo --config debug_config.yaml --run demo
    ftpipe finetune-dpo --run demo --resume-from latest
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ftpipe.core.errors import ConfigError, InputError, StageError
from ftpipe.core.model_ref import resolve_model
from ftpipe.core.runs import RunDir
from ftpipe.core.stage import StageContext, StageResult, require_upstream
from ftpipe.handoff.pairs import read_pairs

log = logging.getLogger(__name__)

STATE_DIR = "dpo_trainer_state"  # outputs/<run>/dpo_trainer_state/: checkpoints, tensorboard/, results
ADAPTER_DIR = "dpo_adapter"  # outputs/<run>/dpo_adapter/: the stage's product (`produces` in the table)
RESULTS_FILE = "ftpipe_dpo_results.json"
COMMAND = "ftpipe finetune-dpo"
REFERENCE = {
    "sft": "frozen copy of the SFT adapter",
    "base": "base, adapter disabled",
}


def state_dir(run: RunDir) -> Path:
    """outputs/<run>/dpo_trainer_state/ (apart from SFT's trainer_state/, whose curves the report reads)."""
    return run.path / STATE_DIR


def adapter_dir(run: RunDir) -> Path:
    """outputs/<run>/dpo_adapter/: the DPO LoRA adapter, relative to the raw base model."""
    return run.path / ADAPTER_DIR


def prepare(ctx: StageContext) -> dict[str, Path]:
    """Every check before the model is loaded; the inputs to record.

    `ctx.options`: `resume_from` (None | "latest" | "auto" | checkpoint path), `progress`.

    Raises:
        InputError: no completed finetune-sft (dpo.init=sft), SFT adapter not a LoRA adapter,
            no prepared pairs (names `ftpipe preprocess-dpo`), a bad pair.
        ConfigError: more than one training process, settings this machine cannot run.
    """
    cfg = ctx.config
    dpo = cfg.dpo
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise ConfigError(f"finetune-dpo runs in one process (started with WORLD_SIZE={world}): multi-process DPO "
                          "is not supported", hint=f"run `{COMMAND}` without torchrun / accelerate launch")
    run = ctx.run
    inputs: dict[str, Path] = {}
    if dpo.init == "sft":
        require_upstream(ctx)  # names `ftpipe finetune-sft --run <run>`
        sft = run.adapter
        if not (sft / "adapter_config.json").is_file():
            what = "a full model (finetune.method=full)" if (sft / "config.json").is_file() else "not a LoRA adapter"
            raise InputError(f"dpo.init=sft: {ctx.project.rel(sft)} is {what}; DPO continues a LoRA adapter",
                             hint=f"--set dpo.init=base, or ftpipe finetune-sft --run {run.name} --force "
                             "--set finetune.method=lora")
        inputs["finetune-sft"] = run.manifest_path("finetune-sft")
        inputs["sft_adapter"] = sft
    name = cfg.preference.name
    prepared = ctx.project.prepared_dir(name)
    train = prepared / "train.jsonl"
    count = sum(1 for _ in read_pairs(train))  # InputError (missing file, bad line) names preprocess-dpo
    if count == 0:
        raise InputError(f"{ctx.project.rel(train)}: no preference pairs", hint="ftpipe preprocess-dpo --force")
    inputs["train"] = train
    if (prepared / "val.jsonl").is_file():
        inputs["val"] = prepared / "val.jsonl"
    manifest = ctx.project.prepared_log_dir(name) / "manifest.json"
    if manifest.is_file():
        inputs["prepared_manifest"] = manifest
    model_ref = resolve_model(cfg.model, ctx.project.root)
    if model_ref.path:
        inputs["base_model"] = Path(model_ref.path)
    return inputs


def run(ctx: StageContext) -> StageResult:
    """Load base (+ SFT adapter), train with DPOTrainer, publish outputs/<run>/dpo_adapter atomically."""
    from ftpipe.training.checkpoints import BatchShape, check_resume_batch, clear_for_fresh_start, resolve_resume
    from ftpipe.training.sft import TENSORBOARD_DIR

    cfg, project, run_dir = ctx.config, ctx.project, ctx.run
    dpo = cfg.dpo
    state = state_dir(run_dir)
    resume = resolve_resume(ctx.options.get("resume_from"), state, project.rel, command=COMMAND)
    if resume is None:
        clear_for_fresh_start(ctx, state, state / TENSORBOARD_DIR, COMMAND, what="DPO checkpoints")
    else:
        log.info("resuming from %s", project.rel(resume))
        check_resume_batch(resume, BatchShape(1, dpo.batch_size, dpo.gradient_accumulation_steps),
                           dpo.gradient_accumulation_steps, project.rel)
    state.mkdir(parents=True, exist_ok=True)
    (state / RESULTS_FILE).unlink(missing_ok=True)

    prepared = project.prepared_dir(cfg.preference.name)
    val_file = prepared / "val.jsonl"
    metrics = train(ctx, prepared / "train.jsonl", val_file if val_file.is_file() else None, state, resume)

    final = adapter_dir(run_dir)
    acc, margin = metrics.get("final_reward_accuracy"), metrics.get("final_reward_margin")
    rewards = (f"reward accuracy {acc:.2f}, margin {margin:.3f}" if acc is not None and margin is not None
               else "no rewards logged")
    summary = (f"finetune-dpo: run {run_dir.name}: {metrics['global_step']} steps on {metrics['train_pairs']} pairs, "
               f"loss {metrics['final_loss']}, {rewards} (init {dpo.init}, reference: {metrics['reference']}) "
               f"-> {project.rel(final)}/")
    return StageResult(outputs=[final, state / RESULTS_FILE], metrics=metrics, summary=summary)


def _precision() -> tuple[str, str]:
    """(device, precision): CUDA bf16 where supported (else fp32); the CPU trains in fp32."""
    import torch

    if torch.cuda.is_available():
        return "cuda", "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "cpu", "fp32"


def load_pairs(path: Path) -> list[dict[str, Any]]:
    """The prepared pairs of one split as TRL's conversational preference rows."""
    return list(read_pairs(path))


def dpo_args(dpo, output_dir: Path, device: str, precision: str, has_eval: bool):
    """The TRL DPOConfig for the `dpo` section (one place: the tests and the demo measure the same)."""
    from trl import DPOConfig

    return DPOConfig(
        output_dir=str(output_dir),
        beta=dpo.beta,
        loss_type=[dpo.loss_type],
        label_smoothing=dpo.label_smoothing,
        learning_rate=dpo.learning_rate,
        lr_scheduler_type=dpo.lr_scheduler,
        warmup_steps=dpo.warmup_ratio,  # transformers 5: a float < 1 is a ratio of the total steps
        num_train_epochs=dpo.epochs,
        max_steps=dpo.max_steps,
        per_device_train_batch_size=dpo.batch_size,
        per_device_eval_batch_size=dpo.batch_size,
        gradient_accumulation_steps=dpo.gradient_accumulation_steps,
        max_length=dpo.max_length,
        logging_steps=dpo.logging_steps,
        save_strategy="steps",
        save_steps=dpo.save_steps,
        save_total_limit=dpo.save_total_limit,
        eval_strategy="no",  # held-out pairs are scored once, after training (eval_* metrics)
        seed=dpo.seed,
        data_seed=dpo.seed,
        bf16=precision == "bf16",
        fp16=False,
        use_cpu=device == "cpu",
        gradient_checkpointing=False,  # LoRA on one device: memory is not the limit, speed is
        include_num_input_tokens_seen="non_padding",  # the tokens/s of run.log and the progress bar
        report_to="none",  # the TensorBoard callback is added with a fixed folder
        disable_tqdm=True,
        dataloader_num_workers=0,
        save_only_model=False,
        dataset_num_proc=None,
    )


def train(ctx: StageContext, train_file: Path, val_file: Path | None, state: Path,
          resume: Path | None) -> dict[str, Any]:
    """Train in this process and publish the adapter; returns the manifest metrics.

    Raises:
        Interrupted: Ctrl-C / SIGTERM stopped training after a checkpoint was saved.
        ConfigError: TRL rejected a setting.
        StageError: TRL did not set up the reference this stage promises.
    """
    import torch
    from datasets import Dataset
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from transformers.integrations import TensorBoardCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import DPOTrainer

    from ftpipe.training.sft import TENSORBOARD_DIR, StopFlag, AlreadyTrained, finished_checkpoint, make_callback

    cfg, project, run_dir = ctx.config, ctx.project, ctx.run
    dpo = cfg.dpo
    model_ref = resolve_model(cfg.model, project.root)
    model_kwargs: dict[str, Any] = {**model_ref.pretrained_kwargs(), "trust_remote_code": cfg.model.trust_remote_code}
    device, precision = _precision()
    if device == "cpu":
        from ftpipe.training.cpu_fastpath import fuse_lora_linear
        from ftpipe.training.plan import thread_count

        torch.set_num_threads(thread_count())
        fuse_lora_linear()  # uses the active adapter: "ref" for TRL's reference pass; disabled adapters: plain path
    set_seed(dpo.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_ref.load_from, **model_kwargs)
    if not tokenizer.chat_template:
        raise InputError(f"base model {model_ref.id or cfg.model.path}: its tokenizer has no chat template, needed "
                         "to render the conversational pairs", hint="use an instruct/chat model")
    dtype = cfg.model.dtype if cfg.model.dtype != "auto" else ("bfloat16" if precision == "bf16" else "float32")
    model = AutoModelForCausalLM.from_pretrained(model_ref.load_from, dtype=getattr(torch, dtype), **model_kwargs)
    peft_config = None
    if dpo.init == "sft":
        # The SFT adapter becomes the trainable "default"; DPOTrainer adds a frozen copy "ref".
        model = PeftModel.from_pretrained(model, str(run_dir.adapter), is_trainable=True)
    else:
        peft_config = LoraConfig(r=dpo.lora_r, lora_alpha=dpo.lora_alpha, lora_dropout=dpo.lora_dropout,
                                 target_modules=dpo.target_modules, task_type="CAUSAL_LM")
    reference = REFERENCE[dpo.init]
    log.info("init: %s; reference: %s", "the SFT adapter " + project.rel(run_dir.adapter) if dpo.init == "sft"
             else "a new LoRA on the base model", reference)

    train_pairs = load_pairs(train_file)
    train_ds = Dataset.from_list(train_pairs)
    eval_ds = Dataset.from_list(load_pairs(val_file)) if val_file is not None else None
    stop = StopFlag()
    callback = make_callback(stop, ctx.options.get("progress"))
    tensorboard = TensorBoardCallback()
    tensorboard.logging_dir = str(state / TENSORBOARD_DIR)
    args = dpo_args(dpo, state, device, precision, eval_ds is not None)
    try:
        trainer = DPOTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                             processing_class=tokenizer, peft_config=peft_config,
                             callbacks=[callback, tensorboard, _rewards_logger()])
    except ValueError as exc:
        raise ConfigError(f"dpo: TRL rejected the settings: {exc}".splitlines()[0],
                          hint="check dpo.loss_type / max_length / label_smoothing") from None
    for noisy in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(noisy)
    adapters = sorted(trainer.model.peft_config)
    if dpo.init == "sft" and adapters != ["default", "ref"]:
        raise StageError(f"DPOTrainer did not add the frozen reference adapter (adapters: {adapters})",
                         hint="check the peft version (>= 0.20) or use --set dpo.init=base")
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    log.info("adapters: %s; trainable parameters: %d; %d training pairs%s; %s, %s", ", ".join(adapters), trainable,
             len(train_ds), f", {len(eval_ds)} held-out" if eval_ds is not None else "", device, precision)

    started = time.monotonic()
    with stop:
        try:
            train_loss = float(trainer.train(resume_from_checkpoint=str(resume) if resume else None).training_loss)
        except AlreadyTrained:
            train_loss = finished_checkpoint(trainer.state, callback, resume.name)
    tstate = trainer.state
    if callback.interrupted_at is not None:
        from ftpipe.training.sft import Interrupted

        raise Interrupted(
            f"{stop.signal_name or 'stop signal'}: training stopped at step {tstate.global_step}/{tstate.max_steps}; "
            f"checkpoint saved in checkpoint-{tstate.global_step}/",
            hint=f"{COMMAND} --run {run_dir.name} --resume-from latest",
        )
    seconds = time.monotonic() - started
    last = next((h for h in reversed(tstate.log_history) if "rewards/accuracies" in h), {})
    metrics: dict[str, Any] = {
        "init": dpo.init,
        "reference": reference,
        "global_step": tstate.global_step,
        "max_steps": tstate.max_steps,
        "epochs": round(float(tstate.epoch or 0.0), 4),
        "train_pairs": len(train_ds),
        "train_loss": round(train_loss, 6),
        "first_logged_loss": callback.first_loss,
        "final_loss": callback.last_loss if callback.last_loss is not None else round(train_loss, 6),
        "final_reward_accuracy": last.get("rewards/accuracies"),
        "final_reward_margin": last.get("rewards/margins"),
        "final_rewards_chosen": last.get("rewards/chosen"),
        "final_rewards_rejected": last.get("rewards/rejected"),
        "trainable_parameters": trainable,
        "train_seconds": round(seconds, 2),
        "device": device,
        "precision": precision,
        "beta": dpo.beta,
        "loss_type": dpo.loss_type,
        "resumed_from": resume.name if resume else None,
        "tensorboard_dir": project.rel(state / TENSORBOARD_DIR),
    }
    if eval_ds is not None:
        held_out = trainer.evaluate()
        metrics["val_pairs"] = len(eval_ds)
        metrics["eval_loss"] = round(float(held_out["eval_loss"]), 6)
        metrics["eval_reward_accuracy"] = held_out.get("eval_rewards/accuracies")
        metrics["eval_reward_margin"] = held_out.get("eval_rewards/margins")
        log.info("held-out pairs: loss %.4f, reward accuracy %.3f, margin %.3f", metrics["eval_loss"],
                 metrics["eval_reward_accuracy"], metrics["eval_reward_margin"])
    _publish(trainer, tokenizer, adapter_dir(run_dir), model_ref.record(project.root))
    from ftpipe.core.fsutil import atomic_write_json

    atomic_write_json(state / RESULTS_FILE, metrics)
    return metrics


def _rewards_logger():
    from transformers import TrainerCallback

    class RewardsLog(TrainerCallback):
        """The DPO rewards next to sft.py's loss line in run.log."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "rewards/accuracies" in logs:
                log.info("step %d/%d rewards: accuracy %.3f margin %.4f chosen %.4f rejected %.4f",
                         state.global_step, state.max_steps, logs["rewards/accuracies"], logs["rewards/margins"],
                         logs["rewards/chosen"], logs["rewards/rejected"])

    return RewardsLog()


def _publish(trainer, tokenizer, final: Path, base_model_record: dict[str, Any]) -> None:
    """Write the trained adapter ("default" only, not TRL's "ref" copy) to a temp folder, then rename it.

    A crash leaves the previous adapter (or none) and a `.dpo_adapter.tmp` folder, never a half-written
    outputs/<run>/dpo_adapter.
    """
    from ftpipe.handoff.base_model import write_base_model

    tmp = final.with_name(f".{final.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    trainer.model.save_pretrained(str(tmp), selected_adapters=["default"], safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    template = tmp / "chat_template.jinja"
    if not template.exists() and isinstance(tokenizer.chat_template, str):
        template.write_text(tokenizer.chat_template, encoding="utf-8")
    write_base_model(tmp, base_model_record)
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    log.info("saved the DPO adapter to %s", final)
