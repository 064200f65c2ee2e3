"""Stage `finetune-dpo`: preference tuning (DPO) with TRL's DPOTrainer on prepared/<preference.name>/.

After `finetune-sft` (and `preprocess-dpo`, which writes the pairs), before eval / serve. Reads the
prepared pairs through `ftpipe.handoff.pairs`, trains a LoRA adapter with DPO in this process and
writes outputs/<run>/dpo_adapter/ (checkpoints and TensorBoard events in outputs/<run>/dpo_trainer_state/).

- `check(ctx)`: the SFT adapter (init=sft), the pairs, one process only;
- `plan(ctx)`: base model, device and precision, the chat template, the checkpoint to resume
  from (`FinetuneDpoPlan`);
- `run(ctx, plan)`: trains through the shared harness (`harness.py`: threads, seed, callbacks,
  interruption, the atomic publish), with `dpo_recipe` for what is DPO's own.

The reference model is never a second copy of the model in memory:
- `dpo.init: sft` (default): the run's SFT adapter is loaded as the trainable adapter "default";
  TRL adds a frozen copy named "ref" and computes the reference log-probs through it. The result
  is a LoRA adapter on the raw base (as the SFT adapter is), so a server can load both side by side.
- `dpo.init: base`: a new LoRA on the base model; the reference is the base, adapter disabled.

    ftpipe finetune-dpo --config debug_config.yaml --run demo
    ftpipe finetune-dpo --run demo --resume-from latest
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ftpipe.core.errors import ConfigError, InputError, StageError
from ftpipe.core.model_ref import resolve_model
from ftpipe.core.runs import RunDir
from ftpipe.core.stage import StageContext, StageResult, require_upstream
from ftpipe.handoff import chosen_template
from ftpipe.handoff.pairs import read_pairs
from ftpipe.training import harness
from ftpipe.training.harness import TENSORBOARD_DIR, Trainee, TrainerRecipe

log = logging.getLogger(__name__)

STATE_DIR = "dpo_trainer_state"  # outputs/<run>/dpo_trainer_state/: checkpoints, tensorboard/, results
ADAPTER_DIR = "dpo_adapter"  # outputs/<run>/dpo_adapter/: the stage's product (`produces` in the table)
RESULTS_FILE = "ftpipe_dpo_results.json"
COMMAND = "ftpipe finetune-dpo"
REFERENCE = {
    "sft": "frozen copy of the SFT adapter",
    "base": "base, adapter disabled",
}


@dataclass(frozen=True)
class FinetuneDpoPlan:
    """What finetune-dpo resolved before training."""

    load_from: str  # base model folder or hub id
    model_kwargs: Mapping[str, Any]  # revision / trust_remote_code for from_pretrained
    base_model_record: Mapping[str, Any]  # {"id", "revision", "path"} -> ftpipe_base_model.json
    device: str  # cpu | cuda
    precision: str  # bf16 | fp32
    dtype: str  # the base weights' torch dtype
    sft_adapter: Path | None  # init=sft: the run's SFT adapter, trained on as "default"
    train_file: Path
    val_file: Path | None  # held-out pairs, scored once after training
    state_dir: Path  # outputs/<run>/dpo_trainer_state
    adapter_dir: Path  # outputs/<run>/dpo_adapter
    resume: Path | None  # a complete checkpoint, or None to start over
    chat_template: str | None = None  # model.chat_template's text, replacing the base tokenizer's


def state_dir(run: RunDir) -> Path:
    """outputs/<run>/dpo_trainer_state/ (apart from SFT's trainer_state/, whose curves the report reads)."""
    return run.path / STATE_DIR


def adapter_dir(run: RunDir) -> Path:
    """outputs/<run>/dpo_adapter/: the DPO LoRA adapter, relative to the raw base model."""
    return run.path / ADAPTER_DIR


def check(ctx: StageContext) -> dict[str, Path]:
    """Every check before the model is loaded; the inputs to record.

    Returns:
        The inputs: the finetune-sft manifest and SFT adapter (init=sft), the pairs, the prepared
        set's manifest, the base model folder.

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


def plan(ctx: StageContext) -> FinetuneDpoPlan:
    """Base model, device, precision, the chat template and the checkpoint to resume from.

    Raises:
        InputError: the tokenizer has no chat template; an unusable `--resume-from`
            (`ctx.options["resume_from"]`: None | "latest" | "auto" | checkpoint path).
    """
    from transformers import AutoTokenizer

    from ftpipe.training.checkpoints import BatchShape, check_resume_batch, resolve_resume

    cfg, project, run_dir = ctx.config, ctx.project, ctx.run
    dpo = cfg.dpo
    model_ref = resolve_model(cfg.model, project.root)
    model_kwargs: dict[str, Any] = {**model_ref.pretrained_kwargs(), "trust_remote_code": cfg.model.trust_remote_code}
    tokenizer = AutoTokenizer.from_pretrained(model_ref.load_from, **model_kwargs)
    chosen = chosen_template.use(tokenizer, cfg.model, project.root, cfg.model.path or model_ref.load_from,
                                 "ftpipe finetune-dpo")
    device, precision = _precision()
    dtype = cfg.model.dtype if cfg.model.dtype != "auto" else ("bfloat16" if precision == "bf16" else "float32")

    state = state_dir(run_dir)
    resume = resolve_resume(ctx.options.get("resume_from"), state, project.rel, command=COMMAND)
    if resume is not None:
        log.info("resuming from %s", project.rel(resume))
        check_resume_batch(resume, BatchShape(1, dpo.batch_size, dpo.gradient_accumulation_steps),
                           dpo.gradient_accumulation_steps, project.rel)
    prepared = project.prepared_dir(cfg.preference.name)
    val_file = prepared / "val.jsonl"
    return FinetuneDpoPlan(
        load_from=model_ref.load_from, model_kwargs=model_kwargs, base_model_record=model_ref.record(project.root),
        device=device, precision=precision, dtype=dtype,
        sft_adapter=run_dir.adapter if dpo.init == "sft" else None,
        train_file=prepared / "train.jsonl", val_file=val_file if val_file.is_file() else None,
        state_dir=state, adapter_dir=adapter_dir(run_dir), resume=resume,
        chat_template=chosen.text if chosen is not None else None,
    )


def run(ctx: StageContext, plan: FinetuneDpoPlan) -> StageResult:
    """Train with DPOTrainer through the harness; it publishes outputs/<run>/dpo_adapter atomically.

    Raises:
        InputError: DPO checkpoints of an unfinished training, neither resumed nor `--force`d.
        Interrupted: Ctrl-C / SIGTERM stopped training after a checkpoint was saved (exit 130).
        ConfigError: TRL rejected a setting.
        StageError: TRL did not set up the reference this stage promises.
    """
    from ftpipe.training.checkpoints import clear_for_fresh_start

    project, dpo = ctx.project, ctx.config.dpo
    state = plan.state_dir
    if plan.resume is None:
        clear_for_fresh_start(ctx, state, state / TENSORBOARD_DIR, COMMAND, what="DPO checkpoints")
    state.mkdir(parents=True, exist_ok=True)
    (state / RESULTS_FILE).unlink(missing_ok=True)

    metrics = harness.run_training(dpo_recipe(ctx, plan), ctx.progress)

    acc, margin = metrics.get("final_reward_accuracy"), metrics.get("final_reward_margin")
    rewards = (f"reward accuracy {acc:.2f}, margin {margin:.3f}" if acc is not None and margin is not None
               else "no rewards logged")
    summary = (f"finetune-dpo: run {ctx.run.name}: {metrics['global_step']} steps on {metrics['train_pairs']} pairs, "
               f"loss {metrics['final_loss']}, {rewards} (init {dpo.init}, reference: {metrics['reference']}) "
               f"-> {project.rel(plan.adapter_dir)}/")
    return StageResult(outputs=[plan.adapter_dir, state / RESULTS_FILE], metrics=metrics, summary=summary)


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
        loss_type=[dpo.loss_type, "sft"] if dpo.sft_weight > 0 else [dpo.loss_type],
        loss_weights=[1.0, dpo.sft_weight] if dpo.sft_weight > 0 else None,
        label_smoothing=dpo.label_smoothing,
        learning_rate=dpo.learning_rate,
        lr_scheduler_type=dpo.lr_scheduler,
        warmup_steps=dpo.warmup_ratio,  # a float < 1 is read as a ratio of the total steps
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
        report_to="none",  # the harness adds the TensorBoard callback with a fixed folder
        disable_tqdm=True,
        dataloader_num_workers=0,
        save_only_model=False,
        dataset_num_proc=None,
    )


def dpo_recipe(ctx: StageContext, plan: FinetuneDpoPlan) -> TrainerRecipe:
    """What DPO brings to the harness: base (+ SFT adapter) and pairs, the "default" adapter to
    publish, the reference check and the reward metrics."""
    dpo = ctx.config.dpo
    return TrainerRecipe(
        command=COMMAND, run_name=ctx.run.name, section="dpo",
        settings_hint="check dpo.loss_type / max_length / label_smoothing",
        device=plan.device, seed=dpo.seed, fuse_lora=True, output_dir=plan.state_dir, final_dir=plan.adapter_dir,
        artifact="DPO adapter", results_file=RESULTS_FILE, resume_from=str(plan.resume) if plan.resume else None,
        base_model_record=plan.base_model_record,
        build=functools.partial(_build, ctx, plan), save=_save, ready=functools.partial(_ready, ctx),
        finish=functools.partial(_finish, ctx, plan),
    )


def _build(ctx: StageContext, plan: FinetuneDpoPlan) -> Trainee:
    """Tokenizer, base model (+ the SFT adapter as trainable "default"), the pairs and the DPOConfig."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    dpo = ctx.config.dpo
    tokenizer = AutoTokenizer.from_pretrained(plan.load_from, **plan.model_kwargs)
    if plan.chat_template is not None:
        tokenizer.chat_template = plan.chat_template  # model.chat_template (checked in plan)
    model = AutoModelForCausalLM.from_pretrained(plan.load_from, dtype=getattr(torch, plan.dtype), **plan.model_kwargs)
    peft_config = None
    if plan.sft_adapter is not None:
        # The SFT adapter becomes the trainable "default"; DPOTrainer adds a frozen copy "ref".
        model = PeftModel.from_pretrained(model, str(plan.sft_adapter), is_trainable=True)
    else:
        peft_config = LoraConfig(r=dpo.lora_r, lora_alpha=dpo.lora_alpha, lora_dropout=dpo.lora_dropout,
                                 target_modules=dpo.target_modules, task_type="CAUSAL_LM")
    log.info("init: %s; reference: %s", "the SFT adapter " + ctx.project.rel(plan.sft_adapter) if plan.sft_adapter
             else "a new LoRA on the base model", REFERENCE[dpo.init])
    train_ds = Dataset.from_list(load_pairs(plan.train_file))
    val_pairs = load_pairs(plan.val_file) if plan.val_file is not None else []
    eval_ds = Dataset.from_list(val_pairs) if val_pairs else None  # none held out (val_fraction 0): no evaluation
    counts = {"train_pairs": len(train_ds), **({"val_pairs": len(eval_ds)} if eval_ds is not None else {})}
    log.info("%d training pairs%s; %s, %s", len(train_ds), f", {len(eval_ds)} held-out" if eval_ds is not None else "",
             plan.device, plan.precision)
    return Trainee(trainer_cls=DPOTrainer, model=model, tokenizer=tokenizer,
                   args=dpo_args(dpo, plan.state_dir, plan.device, plan.precision, eval_ds is not None),
                   train_dataset=train_ds, eval_dataset=eval_ds, peft_config=peft_config,
                   callbacks=(_rewards_logger(),), metrics=counts)


def _ready(ctx: StageContext, trainer) -> None:
    """The reference this stage promises is there (TRL's frozen "ref" next to "default" for init=sft)."""
    adapters = sorted(trainer.model.peft_config)
    if ctx.config.dpo.init == "sft" and adapters != ["default", "ref"]:
        raise StageError(f"DPOTrainer did not add the frozen reference adapter (adapters: {adapters})",
                         hint="check the peft version (>= 0.20) or use --set dpo.init=base")
    log.info("adapters: %s; trained: default", ", ".join(adapters))


def _save(trainer, folder: Path) -> None:
    """The trained adapter only ("default"), not TRL's frozen "ref" copy."""
    trainer.model.save_pretrained(str(folder), selected_adapters=["default"], safe_serialization=True)


def _finish(ctx: StageContext, plan: FinetuneDpoPlan, trainer, metrics: dict[str, Any],
            held_out: Mapping[str, Any] | None) -> dict[str, Any]:
    """The rewards of the last logged step and of the held-out pairs, and how DPO was set up."""
    dpo = ctx.config.dpo
    last = next((h for h in reversed(trainer.state.log_history) if "rewards/accuracies" in h), {})
    final_loss = metrics["last_logged_loss"] if metrics["last_logged_loss"] is not None else metrics["train_loss"]
    metrics.update({
        "init": dpo.init,
        "reference": REFERENCE[dpo.init],
        "final_loss": final_loss,
        "final_reward_accuracy": last.get("rewards/accuracies"),
        "final_reward_margin": last.get("rewards/margins"),
        "final_rewards_chosen": last.get("rewards/chosen"),
        "final_rewards_rejected": last.get("rewards/rejected"),
        "device": plan.device,
        "precision": plan.precision,
        "beta": dpo.beta,
        "loss_type": dpo.loss_type,
        "sft_weight": dpo.sft_weight,
        "tensorboard_dir": ctx.project.rel(plan.state_dir / TENSORBOARD_DIR),
    })
    if held_out is not None:
        metrics["eval_reward_accuracy"] = held_out.get("eval_rewards/accuracies")
        metrics["eval_reward_margin"] = held_out.get("eval_rewards/margins")
        log.info("held-out pairs: loss %.4f, reward accuracy %.3f, margin %.3f", metrics["eval_loss"],
                 metrics["eval_reward_accuracy"], metrics["eval_reward_margin"])
    return metrics


def _rewards_logger():
    from transformers import TrainerCallback

    class RewardsLog(TrainerCallback):
        """The DPO rewards next to the harness's loss line in run.log."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "rewards/accuracies" in logs:
                log.info("step %d/%d rewards: accuracy %.3f margin %.4f chosen %.4f rejected %.4f",
                         state.global_step, state.max_steps, logs["rewards/accuracies"], logs["rewards/margins"],
                         logs["rewards/chosen"], logs["rewards/rejected"])

    return RewardsLog()
