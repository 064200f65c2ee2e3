"""Config sections `finetune` (LoRA SFT), owned by `finetune-sft`, and `dpo` (preference tuning),
owned by `finetune-dpo`.

Nested into the root config by the stage table (`ftpipe/stages.py` -> `ftpipe/config.py`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ftpipe.core.configbase import Section


class FinetuneConfig(Section):
    """LoRA SFT with TRL (`finetune-sft`)."""

    method: Literal["lora", "dora", "qlora", "full"] = Field("lora", description="Fine-tune method.")
    lora_r: int = Field(16, gt=0, description="LoRA rank.")
    lora_alpha: int = Field(32, gt=0, description="LoRA alpha.")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="LoRA dropout.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Modules to adapt, or `all-linear`."
    )
    max_length: int = Field(1024, gt=0, description="Max tokens per training sequence.")
    packing: Literal["auto", "on", "off"] = Field("auto", description="Sequence packing.")
    assistant_only_loss: bool = Field(True, description="Train only on assistant tokens (chat data).")
    epochs: float = Field(1.0, gt=0, description="Epochs (ignored when max_steps > 0).")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1: use epochs).")
    batch_size: int = Field(4, gt=0, description="Per-device batch size.")
    grad_accum: int = Field(1, gt=0, description="Gradient accumulation steps.")
    micro_batch_size: int | None = Field(
        None, gt=0,
        description="Rows per forward/backward pass; the batch (batch_size x grad_accum rows per optimizer "
        "step) is unchanged. Must divide batch_size. null = auto: on the CPU the largest divisor of batch_size "
        "whose activations fit 1 GiB, with >= 256 tokens per pass (faster and lighter there), on a GPU batch_size.",
    )
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: str = Field("cosine", description="transformers LR scheduler name.")
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0, description="Warm-up fraction of steps.")
    logging_steps: int = Field(10, gt=0, description="Log loss every N steps.")
    save_steps: int = Field(100, gt=0, description="Checkpoint every N steps.")
    save_total_limit: int = Field(3, gt=0, description="Keep at most N checkpoints.")
    eval_steps: int | None = Field(None, gt=0, description="Evaluate on val every N steps (None: off).")
    seed: int = Field(42, description="Training seed.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="`auto`: CUDA bf16/fp16, CPU bf16 where supported, else fp32."
    )
    gradient_checkpointing: Literal["auto", "on", "off"] = Field(
        "auto", description="`auto`: only when memory needs it."
    )
    num_processes: int = Field(1, gt=0, description="Training processes per node (DDP): torchrun on the CPU, "
                               "accelerate launch on GPUs.")
    accelerate_config: str | None = Field(
        None, description="accelerate config file (multi-GPU, FSDP, DeepSpeed) for scale-out."
    )
    nnodes: int = Field(1, gt=0, description="Machines (nodes) training together; every node runs the same "
                        "command with its own node_rank and the same --run.")
    node_rank: int = Field(0, ge=0, description="This node's rank: 0 runs the stage (run folder, manifest, "
                           "adapter); the others join its training.")
    rdzv_endpoint: str | None = Field(
        None, description="HOST:PORT of node 0 where the nodes meet (torchrun c10d rendezvous); needed when "
        "nnodes > 1.",
    )

    @model_validator(mode="after")
    def _nodes(self):
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("finetune.rdzv_endpoint: needed with finetune.nnodes > 1 (HOST:PORT of node 0, "
                             "e.g. --rdzv-endpoint node0.cluster:29500)")
        if self.node_rank >= self.nnodes:
            raise ValueError(f"finetune.node_rank: {self.node_rank} is not below finetune.nnodes ({self.nnodes})")
        if self.rdzv_endpoint:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"finetune.rdzv_endpoint: {self.rdzv_endpoint!r} is not HOST:PORT")
        return self

    @field_validator("packing", "gradient_checkpointing", mode="before")
    @classmethod
    def _yaml_booleans(cls, value):
        # YAML reads `on`/`off` (and `--set finetune.packing=on`) as booleans.
        if isinstance(value, bool):
            return "on" if value else "off"
        return value


DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "apo_zero")


class DpoConfig(Section):
    """Preference tuning with TRL's DPOTrainer (`finetune-dpo`) on prepared/<preference.name>/."""

    init: Literal["sft", "base"] = Field(
        "sft", description="`sft`: continue the run's SFT adapter (outputs/<run>/adapter; reference = a frozen "
        "copy of it); `base`: a new LoRA on the base model (reference = the base, adapter disabled).",
    )
    beta: float = Field(0.1, gt=0, description="DPO beta: how far the policy may move from the reference "
                        "(smaller = further).")
    loss_type: Literal[DPO_LOSS_TYPES] = Field(  # type: ignore[valid-type]
        "sigmoid", description="TRL loss: sigmoid (DPO), ipo, hinge, robust or apo_zero.",
    )
    sft_weight: float = Field(
        0.0, ge=0.0, description="Weight of an SFT term (the chosen answer's mean token NLL, TRL's loss "
        "type `sft`) added to the preference loss, as in RPO: it keeps the chosen answer likely when the "
        "rejected one shares most of its tokens (a near-miss). 0: the preference loss alone.",
    )
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="Assumed label noise (loss_type=robust).")
    learning_rate: float = Field(5e-6, gt=0, description="Peak learning rate.")
    lr_scheduler: str = Field("linear", description="transformers LR scheduler name.")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="Warm-up fraction of steps.")
    epochs: float = Field(1.0, gt=0, description="Epochs over the training pairs (ignored when max_steps > 0).")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1: use epochs).")
    batch_size: int = Field(4, gt=0, description="Pairs per forward/backward pass (each is a chosen and a "
                            "rejected sequence).")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Passes per optimizer step.")
    max_length: int = Field(1024, gt=0, description="Max tokens of prompt + answer; longer pairs are cut at the "
                            "end, pairs whose prompt alone fills it are dropped.")
    logging_steps: int = Field(10, gt=0, description="Log loss and rewards every N steps.")
    save_steps: int = Field(100, gt=0, description="Checkpoint every N steps.")
    save_total_limit: int = Field(3, gt=0, description="Keep at most N checkpoints.")
    seed: int = Field(42, description="Training seed.")
    lora_r: int = Field(16, gt=0, description="init=base only: LoRA rank of the new adapter (init=sft keeps the "
                        "SFT adapter's own LoRA settings).")
    lora_alpha: int = Field(32, gt=0, description="init=base only: LoRA alpha of the new adapter.")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="init=base only: LoRA dropout (TRL disables "
                                "dropout during DPO anyway).")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="init=base only: modules to adapt, or `all-linear`."
    )
