"""Config sections `merge`, `awq`, `gguf` and `ollama` (the export stages)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ftpipe.core.configbase import Section


class MergeConfig(Section):
    """`export-merged`: merge the adapter into its base and verify."""

    max_abs_logit_diff: float = Field(
        1e-3, gt=0, description="Fail when merged vs base+adapter logits differ by more."
    )
    max_abs_logit_diff_16bit: float = Field(
        0.5,
        gt=0,
        description="The same threshold for bfloat16/float16 bases (rounding W + BA to 16 bits "
        "moves logits by ~1e-2..1e-1).",
    )
    verify_prompts: int = Field(
        4, ge=1, description="Sample conversations (from the prepared val split) for the logit check."
    )


class AwqConfig(Section):
    """`convert-awq`: 4-bit AWQ with llm-compressor, calibrated on the run's own training data."""

    scheme: Literal["W4A16", "W4A16_ASYM"] = Field(
        "W4A16", description="Quantization scheme: 4-bit weights, 16-bit activations; symmetric or asymmetric."
    )
    group_size: int = Field(
        128, gt=0, description="Weights per quantization group (presets use 128); hidden and MLP sizes must be multiples."
    )
    calibration_samples: int = Field(64, gt=0, description="Calibration rows drawn from the train split.")
    calibration_max_length: int = Field(256, gt=0, description="Tokens per calibration row (longer rows are cut).")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="dtype the model is quantized in; unquantized tensors (embeddings, norms) keep it. "
        "auto: bfloat16 on a GPU or a CPU with native bf16 (AVX512-BF16 / AMX), float32 on other CPUs, where "
        "emulated bf16 made AWQ 3.5x slower (docs/awq.md).",
    )
    n_grid: int = Field(
        20, ge=3, description="AWQ grid-search points per smoothed layer (fewer: faster, slightly worse scales)."
    )
    seed: int = Field(0, description="Seed of the calibration row sampling.")
    eval_rows: int = Field(64, gt=0, description="Val rows used for the perplexity comparison.")
    verify_prompts: int = Field(8, ge=1, description="Val prompts used for the greedy agreement check.")
    verify_max_new_tokens: int = Field(8, gt=0, description="Greedy tokens generated per verify prompt.")
    max_perplexity_increase: float = Field(
        0.10, ge=0, description="Fail when val perplexity rises more than this fraction over the merged model's."
    )


class GgufConfig(Section):
    """`export-gguf`: llama.cpp conversion of the merged model, verified in llama.cpp."""

    outtypes: list[Literal["f16", "q8_0", "q4_k_m"]] = Field(
        default_factory=lambda: ["f16", "q8_0"],
        min_length=1,
        description="GGUF types to write; q8_0 and q4_k_m are made from f16 by llama-quantize (or "
        "its llama-cpp-python binding); q4_k_m's greedy agreement is reported, not enforced.",
    )
    verify_prompts: int = Field(
        3, ge=1, description="Sample prompts (from the prepared val split) for the llama.cpp check."
    )
    verify_new_tokens: int = Field(8, ge=1, description="Greedy tokens compared per prompt.")
    greedy_tie_tolerance: float = Field(
        0.05,
        ge=0,
        description="A greedy divergence is accepted only when HF's logit for llama.cpp's token is "
        "within this of HF's top logit (a near-tie flipped by f16/q8_0 rounding).",
    )
    converter_dir: str | None = Field(
        None,
        description="llama.cpp tree holding convert_hf_to_gguf.py + gguf-py; default: "
        "$FTPIPE_LLAMA_CPP_DIR, else <gguf venv>/share/llama.cpp (scripts/post-install-gguf.sh).",
    )


class OllamaConfig(Section):
    """`ollama-load`: create an Ollama model over its REST API, with an explicit template and stops."""

    host: str = Field("http://127.0.0.1:11434", description="Ollama server URL.")
    model_name: str | None = Field(None, description="Ollama model name; default: the run name.")
    gguf: Literal["f16", "q8_0", "q4_k_m"] = Field(
        "q8_0", description="Which GGUF of outputs/<run>/gguf/ to load (must be in gguf.outtypes)."
    )
    max_tokens: int = Field(
        64, ge=1, description="num_predict of the check chat; the answer must stop before it."
    )
    timeout: float = Field(600.0, gt=0, description="Seconds per REST call (blob upload included).")
