"""Pick device, precision, base-weight dtype, gradient checkpointing and packing for finetune-sft.

Choices are made once, before training, from the hardware and the model shape, and recorded in
the manifest metrics with the reason for each. Measured on the 2-core AVX-512-bf16 CPU this
project is developed on (docs/finetune.md, bench/train_throughput.py):

- tiny model (hidden 128): fp32 3335 tokens/s vs bf16 autocast 1229 -> small matmuls lose to the
  casts, so the CPU uses bf16 only from `BF16_CPU_MIN_HIDDEN` up;
- 135M Llama shape (hidden 576): bf16 weights + autocast is the fastest setup and halves the
  frozen base's memory.

    ftpipe finetune-sft --config debug_config.yaml --set finetune.precision=fp32
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ftpipe.core.errors import ConfigError

log = logging.getLogger(__name__)

BF16_CPU_MIN_HIDDEN = 512  # below this, bf16 autocast is slower than fp32 on the CPU (measured)
ACTIVATION_MEMORY_FRACTION = 0.5  # checkpointing turns on when activations would exceed this share


@dataclass
class TrainPlan:
    """The resolved training set-up and why each choice was made."""

    device: str
    precision: str  # bf16 | fp16 | fp32 (autocast precision; fp32 = none)
    base_dtype: str  # dtype the (frozen) base weights are loaded in
    gradient_checkpointing: bool
    packing: bool
    reasons: dict[str, str] = field(default_factory=dict)

    def record(self) -> dict:
        """Manifest metrics form."""
        return asdict(self)


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 matmul support (AVX512-BF16 / AMX) in oneDNN."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _available_memory() -> int:
    import torch

    if torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info()
        return int(free)
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def activation_bytes(model_config, tokens: int, element_bytes: int) -> int:
    """Rough activation memory kept for backward for one micro-batch of `tokens` tokens."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    hidden = text.hidden_size
    inter = getattr(text, "intermediate_size", 4 * hidden)
    layers = text.num_hidden_layers
    # Per layer and token: norms, q/k/v/o inputs and outputs, attention output, 3 MLP projections.
    per_token_layer = 12 * hidden + 4 * inter
    return tokens * layers * per_token_layer * element_bytes


def make_plan(cfg, model_config, method: str, sample_lengths: list[int]) -> TrainPlan:
    """Resolve `finetune.precision`, `gradient_checkpointing` and `packing` for this machine.

    Args:
        cfg: the `finetune` section.
        model_config: the base model's transformers config.
        method: lora | dora | qlora | full.
        sample_lengths: token lengths of a sample of training conversations.

    Raises:
        ConfigError: a precision the hardware cannot run (fp16 on CPU, qlora without CUDA).
    """
    import torch

    reasons: dict[str, str] = {}
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if method == "qlora" and not cuda:
        raise ConfigError(
            "finetune.method=qlora needs a CUDA GPU with bitsandbytes (4-bit base); this machine has no GPU",
            hint="--set finetune.method=lora",
        )
    hidden = model_config.get_text_config().hidden_size

    precision = cfg.precision
    if precision == "auto":
        if cuda:
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
            reasons["precision"] = f"CUDA {'with' if precision == 'bf16' else 'without'} bf16 support"
        elif cpu_supports_bf16() and hidden >= BF16_CPU_MIN_HIDDEN:
            precision = "bf16"
            reasons["precision"] = f"CPU has native bf16 and hidden size {hidden} >= {BF16_CPU_MIN_HIDDEN}"
        else:
            precision = "fp32"
            reasons["precision"] = (
                f"hidden size {hidden} < {BF16_CPU_MIN_HIDDEN}: fp32 is faster than bf16 autocast on small matmuls"
                if cpu_supports_bf16() else "CPU without native bf16"
            )
    else:
        reasons["precision"] = "finetune.precision"
    if precision == "fp16" and not cuda:
        raise ConfigError("finetune.precision=fp16 needs a CUDA GPU", hint="--set finetune.precision=auto")
    if precision == "bf16" and not cuda and not cpu_supports_bf16():
        log.warning("finetune.precision=bf16 on a CPU without native bf16: expect it to be slow")

    # The frozen base needs no fp32 master copy: loading it in the compute dtype halves its memory
    # and removes the per-matmul casts. Trainable (LoRA) weights stay fp32 (peft upcasts them).
    if method in ("lora", "dora") and precision in ("bf16", "fp16"):
        base_dtype = "bfloat16" if precision == "bf16" else "float16"
        reasons["base_dtype"] = "frozen base in the compute dtype; adapters in fp32"
    elif method == "qlora":
        base_dtype = "nf4"
        reasons["base_dtype"] = "QLoRA 4-bit base"
    else:
        base_dtype = "float32"
        reasons["base_dtype"] = "trainable weights need fp32 master copies" if method == "full" else "fp32 training"

    tokens = cfg.batch_size * cfg.max_length
    need = activation_bytes(model_config, tokens, 4 if precision == "fp32" else 2)
    available = _available_memory()
    if cfg.gradient_checkpointing == "auto":
        checkpointing = need > ACTIVATION_MEMORY_FRACTION * available
        reasons["gradient_checkpointing"] = (
            f"estimated activations {need / 2**30:.2f} GiB vs {available / 2**30:.1f} GiB available"
        )
    else:
        checkpointing = cfg.gradient_checkpointing == "on"
        reasons["gradient_checkpointing"] = "finetune.gradient_checkpointing"

    if cfg.packing == "auto":
        mean = sum(sample_lengths) / max(1, len(sample_lengths))
        packing = mean < 0.5 * cfg.max_length
        reasons["packing"] = f"mean sample length {mean:.0f} tokens vs max_length {cfg.max_length}"
    else:
        packing = cfg.packing == "on"
        reasons["packing"] = "finetune.packing"

    return TrainPlan(device, precision, base_dtype, checkpointing, packing, reasons)


def plan_from_json(path: Path) -> TrainPlan:
    """Read a plan written by the parent process (multi-process workers use the same plan)."""
    return TrainPlan(**json.loads(Path(path).read_text(encoding="utf-8")))


def thread_count() -> int:
    """Threads torch should use on the CPU: OMP_NUM_THREADS if set, else all usable cores."""
    if os.environ.get("OMP_NUM_THREADS"):
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
