"""Config sections `serve` and `smoke_test`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr

from ftpipe.core.configbase import Section


class ServeConfig(Section):
    """`serve`: an OpenAI-compatible server for one artifact."""

    artifact: Literal["merged", "awq", "adapter", "gguf"] = Field("merged", description="What to serve.")
    host: str = Field("127.0.0.1", description="Bind address; anything else requires api_key.")
    port: int = Field(8000, gt=0, lt=65536, description="Port.")
    api_key: SecretStr | None = Field(None, description="Bearer key clients must send (redacted).")
    startup_timeout: float = Field(600.0, gt=0, description="Seconds to wait for /health.")
    max_model_len: int = Field(1024, gt=0, description="vLLM --max-model-len.")


class SmokeTestConfig(Section):
    """`smoke-test`: chat requests against the served endpoint."""

    base_url: str | None = Field(None, description="Endpoint; default: http://<serve.host>:<serve.port>/v1.")
    prompts: int = Field(4, gt=0, description="How many val prompts to send.")
    max_tokens: int = Field(32, gt=0, description="max_tokens per request.")
