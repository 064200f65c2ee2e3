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
    verify_prompts: int = Field(4, ge=1, description="Sample prompts used for the logit check.")


class AwqConfig(Section):
    """`convert-awq`: 4-bit AWQ with llm-compressor."""

    scheme: Literal["W4A16", "W4A16_ASYM"] = Field("W4A16", description="Quantization scheme.")
    group_size: int = Field(128, gt=0, description="Quantization group size.")
    calibration_samples: int = Field(64, gt=0, description="Calibration rows from the train split.")
    calibration_max_length: int = Field(256, gt=0, description="Tokens per calibration row.")
    max_perplexity_increase: float = Field(
        0.10, ge=0, description="Fail when val perplexity rises more than this fraction."
    )


class GgufConfig(Section):
    """`export-gguf`: llama.cpp conversion."""

    outtypes: list[Literal["f16", "q8_0", "q4_k_m"]] = Field(
        default_factory=lambda: ["f16", "q8_0"], description="GGUF types to write."
    )


class OllamaConfig(Section):
    """`ollama-load`: create an Ollama model over its REST API."""

    host: str = Field("http://127.0.0.1:11434", description="Ollama server URL.")
    model_name: str | None = Field(None, description="Ollama model name; default: the run name.")
    gguf: Literal["f16", "q8_0", "q4_k_m"] = Field("q8_0", description="Which GGUF to load.")
