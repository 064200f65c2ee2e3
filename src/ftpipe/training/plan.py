"""Pick device, precision, base-weight dtype, gradient checkpointing and packing for finetune-sft.

Choices are made once, before training (the stage's `plan`), from the hardware and the model
shape, and recorded in the manifest metrics with the reason for each. Why (the measurements are in
docs/finetune.md and bench/train_throughput.py):

- a CPU without the avx512_bf16 / amx_bf16 flag emulates bf16 (oneDNN), several times slower
  than fp32 -> bf16 on the CPU needs one of those flags;
- with native bf16, bf16 autocast can pay off; whether it does for a given shape is measured at
  plan time with one training-shaped matmul (`bf16_matmul_speedup`); below hidden 512
  (`BF16_CPU_MIN_HIDDEN`) the casts are assumed to dominate (not measured on a native-bf16 CPU);
- with bf16, the frozen base is loaded in bf16 (no per-matmul casts, half the memory); adapters
  stay fp32.

    ftpipe finetune-sft --config debug_config.yaml --set finetune.precision=fp32
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field

from ftpipe.core.errors import ConfigError
from ftpipe.core.runtime_info import cpu_native_bf16

log = logging.getLogger(__name__)

BF16_CPU_MIN_HIDDEN = 512  # below this, bf16 autocast is slower than fp32 on the CPU (measured)
BF16_MIN_SPEEDUP = 1.3  # bf16 autocast also pays casts and fp32 elementwise ops: needs a clear matmul win
ACTIVATION_MEMORY_FRACTION = 0.5  # checkpointing turns on when activations would exceed this share
# On the CPU, a batch whose activations are big trains faster and lighter in micro-batches (same rows
# per optimizer step): passes of >= 256 token rows still run their matmuls near the machine's peak,
# and smaller activations stay in cache and out of memory. A model with small activations is faster
# in one pass: per-pass overhead dominates there (measurements: docs/finetune.md).
CPU_MICRO_BATCH_MIN_TOKENS = 256
CPU_MICRO_BATCH_MAX_ACTIVATIONS = 1 << 30


@dataclass
class TrainPlan:
    """The resolved training set-up and why each choice was made."""

    device: str
    precision: str  # bf16 | fp16 | fp32 (autocast precision; fp32 = none)
    base_dtype: str  # dtype the (frozen) base weights are loaded in
    gradient_checkpointing: bool
    packing: bool
    reasons: dict[str, str] = field(default_factory=dict)
    micro_batch_size: int = 0  # rows per forward/backward pass (0: batch_size)
    grad_accum: int = 1  # passes per optimizer step: the config's grad_accum x batch_size / micro_batch_size

    def record(self) -> dict:
        """Manifest metrics form."""
        return asdict(self)


def bf16_matmul_speedup(rows: int, hidden: int, inner: int, seconds: float = 0.3) -> float:
    """Measured bf16 / fp32 speed of one training-shaped matmul on this CPU (> 1: bf16 faster)."""
    import time

    import torch
    import torch.nn.functional as F

    def rate(dtype) -> float:
        x = torch.randn(rows, hidden).to(dtype)
        w = torch.randn(inner, hidden).to(dtype)
        F.linear(x, w)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 2:
            F.linear(x, w)
            n += 1
        return n / (time.perf_counter() - start)

    return rate(torch.bfloat16) / rate(torch.float32)


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
    micro = micro_batch(cfg, model_config, device, reasons)  # fp32 estimate: independent of precision

    precision = cfg.precision
    if precision == "auto":
        if cuda:
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
            reasons["precision"] = f"CUDA {'with' if precision == 'bf16' else 'without'} bf16 support"
        elif not cpu_native_bf16():
            precision = "fp32"
            reasons["precision"] = "CPU without native bf16 (no avx512_bf16/amx_bf16): emulated bf16 is slower"
        elif hidden < BF16_CPU_MIN_HIDDEN:
            precision = "fp32"
            reasons["precision"] = f"hidden size {hidden} < {BF16_CPU_MIN_HIDDEN}: fp32 beats bf16 autocast on small matmuls"
        else:
            inner = getattr(model_config.get_text_config(), "intermediate_size", 4 * hidden)
            speedup = bf16_matmul_speedup(min(1024, micro * cfg.max_length), hidden, inner)
            precision = "bf16" if speedup >= BF16_MIN_SPEEDUP else "fp32"
            reasons["precision"] = f"measured bf16/fp32 matmul speed {speedup:.2f}x (bf16 from {BF16_MIN_SPEEDUP}x)"
    else:
        reasons["precision"] = "finetune.precision"
    if precision == "fp16" and not cuda:
        raise ConfigError("finetune.precision=fp16 needs a CUDA GPU", hint="--set finetune.precision=auto")
    if precision == "bf16" and not cuda and not cpu_native_bf16():
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

    tokens = micro * cfg.max_length
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

    accum = cfg.grad_accum * (cfg.batch_size // micro)
    return TrainPlan(device, precision, base_dtype, checkpointing, packing, reasons, micro, accum)


def micro_batch(cfg, model_config, device: str, reasons: dict[str, str]) -> int:
    """Rows per forward/backward pass (a divisor of `batch_size`); the reason goes to `reasons`.

    Raises:
        ConfigError: `finetune.micro_batch_size` does not divide `finetune.batch_size`.
    """
    if cfg.micro_batch_size is not None:
        if cfg.batch_size % cfg.micro_batch_size:
            raise ConfigError(
                f"finetune.micro_batch_size {cfg.micro_batch_size} does not divide finetune.batch_size {cfg.batch_size}",
                hint="pick a divisor of batch_size, or leave micro_batch_size unset (auto)",
            )
        reasons["micro_batch_size"] = "finetune.micro_batch_size"
        return cfg.micro_batch_size
    if device != "cpu":
        reasons["micro_batch_size"] = "GPU: the whole batch in one pass"
        return cfg.batch_size
    divisors = [d for d in range(1, cfg.batch_size + 1) if cfg.batch_size % d == 0]
    floor = next(d for d in divisors if d * cfg.max_length >= CPU_MICRO_BATCH_MIN_TOKENS or d == cfg.batch_size)
    fits = [d for d in divisors if d >= floor and activation_bytes(model_config, d * cfg.max_length, 4) <= CPU_MICRO_BATCH_MAX_ACTIVATIONS]
    micro = max(fits) if fits else floor
    full = activation_bytes(model_config, cfg.batch_size * cfg.max_length, 4) / 2**20
    if micro == cfg.batch_size:
        reasons["micro_batch_size"] = (
            f"CPU: the whole batch ({micro} x {cfg.max_length} tokens, ~{full:.0f} MiB of activations) in one pass"
        )
    else:
        reasons["micro_batch_size"] = (
            f"CPU: {micro} x {cfg.max_length} tokens per pass: the whole batch would keep ~{full:.0f} MiB of "
            f"activations (passes of >= {CPU_MICRO_BATCH_MIN_TOKENS} tokens and <= "
            f"{CPU_MICRO_BATCH_MAX_ACTIVATIONS // 2**20} MiB are faster and lighter)"
        )
    return micro


def thread_count() -> int:
    """Threads torch should use on the CPU: OMP_NUM_THREADS if set, else all usable cores."""
    if os.environ.get("OMP_NUM_THREADS"):
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
