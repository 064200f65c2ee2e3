"""Config sections `serve` and `smoke_test`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr

from ftpipe.core.configbase import Section


class ServeConfig(Section):
    """`serve`: an OpenAI-compatible server for one artifact (vLLM; llama.cpp for GGUF)."""

    artifact: Literal["merged", "awq", "adapter", "adapters", "gguf"] = Field(
        "merged", description="What to serve: merged / awq (vLLM), adapter (vLLM + LoRA on its base), adapters "
        "(vLLM: the base with the SFT and DPO adapters side by side, <run>-base / <run>-sft / <run>-dpo), gguf (llama.cpp).",
    )
    host: str = Field("127.0.0.1", description="Bind address; anything but loopback requires serve.api_key.")
    port: int = Field(8000, gt=0, lt=65536, description="Port.")
    api_key: SecretStr | None = Field(
        None,
        description="Bearer key clients must send (redacted everywhere; prefer FTPIPE__SERVE__API_KEY in the environment).",
    )
    startup_timeout: float = Field(600.0, gt=0, description="Seconds to wait for the server's /health.")
    stop_timeout: float = Field(30.0, gt=0, description="Seconds to wait after SIGTERM before SIGKILL.")
    max_model_len: int = Field(1024, gt=0, description="vLLM --max-model-len / llama.cpp n_ctx.")
    max_num_seqs: int | None = Field(None, gt=0, description="vLLM --max-num-seqs (concurrent sequences); default vLLM's.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="vLLM --dtype.")
    cpu_kv_cache_gib: int = Field(
        1, gt=0, description="KV cache size in GiB when vLLM runs on the CPU (VLLM_CPU_KVCACHE_SPACE)."
    )
    gguf_type: Literal["f16", "q8_0", "q4_k_m"] = Field("q8_0", description="Which GGUF file to serve (artifact gguf).")
    extra_args: list[str] = Field(
        default_factory=list, description="Extra vLLM arguments appended as given (e.g. [--enforce-eager]); "
        "not passed to llama.cpp's server (serve.llama_cpp_args).",
    )
    llama_cpp_args: list[str] | None = Field(
        None, description="Extra arguments of llama-cpp-python's server (artifact gguf), appended as given "
        "(e.g. [--n_threads, '2']).", json_schema_extra={"in_hash": "when set"},
    )


class SmokeTestConfig(Section):
    """`smoke-test`: chat requests against the served endpoint, checked."""

    base_url: str | None = Field(
        None, description="Endpoint; default: http://<serve.host>:<serve.port>/v1 (loopback when serve.host is 0.0.0.0)."
    )
    prompts: int = Field(4, gt=0, description="How many val prompts to send.")
    max_tokens: int = Field(32, gt=0, description="max_tokens per request; answers must stop at EOS before it.")
    timeout: float = Field(60.0, gt=0, description="Seconds per request.")
    concurrency: int = Field(
        8, gt=0, description="Requests in flight at once against vLLM, which batches them (greedy answers are the same "
        "as one at a time); 1 sends them one by one. llama.cpp's server is always asked one request at a time.",
    )
    check_template: bool = Field(
        True, description="Compare the server's /tokenize of chat messages with HF apply_chat_template (vLLM only)."
    )
    prompt_checks: bool = Field(True, description="Run the checks in eval.prompts_file when that file exists.")
    min_check_pass_rate: float = Field(
        1.0, ge=0.0, le=1.0,
        description="Fraction of eval.prompts_file checks the served model must pass (1.0: all).",
    )
