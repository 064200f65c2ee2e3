"""Device / precision / checkpointing / packing choices (no training)."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from ftpipe.config import load_config
from ftpipe.core.errors import ConfigError
from ftpipe.core.runtime_info import cpu_native_bf16
from ftpipe.training.config import FinetuneConfig
from ftpipe.training.plan import BF16_CPU_MIN_HIDDEN, make_plan


def llama(hidden: int, layers: int = 2) -> LlamaConfig:
    return LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)


def test_cpu_precision_follows_hardware_and_model_size():
    small = make_plan(FinetuneConfig(), llama(128), "lora", [30, 40])
    assert (small.device, small.precision, small.base_dtype) == ("cpu", "fp32", "float32")
    big = make_plan(FinetuneConfig(), llama(576), "lora", [30, 40])
    assert 576 >= BF16_CPU_MIN_HIDDEN
    if not cpu_native_bf16():
        # oneDNN emulates bf16 on plain AVX-512, several times slower than fp32.
        assert big.precision == "fp32"
        assert big.reasons["precision"].startswith("CPU without native bf16")
    else:
        assert big.reasons["precision"].startswith("measured bf16/fp32 matmul speed")
        assert big.base_dtype == ("bfloat16" if big.precision == "bf16" else "float32")
    full = make_plan(FinetuneConfig(method="full", precision="bf16"), llama(576), "full", [30])
    assert full.base_dtype == "float32"  # trainable weights keep fp32 master copies
    lora = make_plan(FinetuneConfig(precision="bf16"), llama(576), "lora", [30])
    assert lora.base_dtype == "bfloat16"  # frozen base in the compute dtype


def test_native_bf16_is_read_from_the_cpu_flags():
    flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    assert cpu_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_packing_and_checkpointing_auto():
    cfg = FinetuneConfig(max_length=256)
    assert make_plan(cfg, llama(128), "lora", [30] * 10).packing is True
    assert make_plan(cfg, llama(128), "lora", [200] * 10).packing is False
    assert make_plan(cfg, llama(128), "lora", [30]).gradient_checkpointing is False
    huge = FinetuneConfig(max_length=1_000_000, batch_size=64)
    assert make_plan(huge, llama(4096, layers=64), "lora", [30]).gradient_checkpointing is True
    assert make_plan(FinetuneConfig(gradient_checkpointing="on"), llama(128), "lora", [30]).gradient_checkpointing


def test_gpu_only_settings_are_rejected_on_cpu():
    with pytest.raises(ConfigError, match="finetune.method=qlora needs a CUDA GPU"):
        make_plan(FinetuneConfig(method="qlora"), llama(128), "qlora", [30])
    with pytest.raises(ConfigError, match="finetune.precision=fp16 needs a CUDA GPU"):
        make_plan(FinetuneConfig(precision="fp16"), llama(128), "lora", [30])


def test_yaml_on_off_values_are_accepted(tmp_path):
    loaded = load_config(None, ["model.path=m", "finetune.packing=on", "finetune.gradient_checkpointing=off"])
    assert loaded.config.finetune.packing == "on"
    assert loaded.config.finetune.gradient_checkpointing == "off"


def smollm_135m() -> LlamaConfig:
    return LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, vocab_size=49152)


def test_cpu_splits_a_big_batch_into_micro_batches():
    plan = make_plan(FinetuneConfig(batch_size=4, max_length=256, grad_accum=2), smollm_135m(), "lora", [40])
    # Same rows per optimizer step (4 x 2), in passes of >= 256 tokens whose activations fit 1 GiB
    # (~400 MB per 256 tokens for this shape).
    assert (plan.micro_batch_size, plan.grad_accum) == (2, 4)
    assert plan.reasons["micro_batch_size"].startswith("CPU: 2 x 256 tokens per pass")
    short = make_plan(FinetuneConfig(batch_size=16, max_length=64), smollm_135m(), "lora", [40])
    assert (short.micro_batch_size, short.grad_accum) == (8, 2)  # 8 x 64 = 512 tokens per pass
    long = make_plan(FinetuneConfig(batch_size=4, max_length=1024), smollm_135m(), "lora", [40])
    assert (long.micro_batch_size, long.grad_accum) == (1, 4)  # over 1 GiB even alone: one row per pass
    tiny = make_plan(FinetuneConfig(batch_size=8, max_length=256), llama(128), "lora", [40])
    assert (tiny.micro_batch_size, tiny.grad_accum) == (8, 1)  # small activations: one pass is faster
    assert tiny.reasons["micro_batch_size"].startswith("CPU: the whole batch")


def test_micro_batch_size_setting_must_divide_the_batch():
    plan = make_plan(FinetuneConfig(batch_size=6, micro_batch_size=3), llama(128), "lora", [40])
    assert (plan.micro_batch_size, plan.grad_accum) == (3, 2)
    with pytest.raises(ConfigError, match="finetune.micro_batch_size 4 does not divide finetune.batch_size 6"):
        make_plan(FinetuneConfig(batch_size=6, micro_batch_size=4), llama(128), "lora", [40])
