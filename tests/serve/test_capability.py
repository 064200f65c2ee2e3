"""What this machine's vLLM can serve, decided before a server starts; the cause of a failure, found
in a server's log. Fast: the W4A16 probe is faked here, so both of its answers are asserted on every
machine (the real probe on this machine's CPU, and on an AVX2-only one: tests/serve/test_serve_awq.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftpipe.core.errors import InputError
from ftpipe.serve import capability
from ftpipe.serve.capability import KernelProbe, is_weight_only_4bit, loaded_kernel_library
from ftpipe.serve.served import Served
from ftpipe.serve.server_record import root_cause

W4A16 = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {
    "targets": ["Linear"], "input_activations": None, "weights": {"num_bits": 4, "group_size": 128, "type": "int"}}}}


def test_weight_only_4bit_configs() -> None:
    assert is_weight_only_4bit({"quantization_config": W4A16})
    w8a8 = json.loads(json.dumps(W4A16))
    w8a8["config_groups"]["group_0"].update(weights={"num_bits": 8}, input_activations={"num_bits": 8})
    assert not is_weight_only_4bit({"quantization_config": w8a8})
    assert is_weight_only_4bit({"quantization_config": {"quant_method": "awq", "bits": 4}})
    assert is_weight_only_4bit({"quantization_config": {"quant_method": "gptq", "bits": 4}})
    assert not is_weight_only_4bit({"quantization_config": {"quant_method": "gptq", "bits": 8}})
    assert not is_weight_only_4bit({"architectures": ["LlamaForCausalLM"]})
    assert not is_weight_only_4bit(None)


def test_the_loaded_kernel_library_is_read_from_the_process_maps(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /venv/lib/python3.11/site-packages/torch/lib/libtorch_cpu.so\n"
                    "7f02-7f03 r-xp 0 08:01 2 /venv/lib/python3.11/site-packages/vllm/_C_AVX2.abi3.so\n")
    assert loaded_kernel_library(maps) == "_C_AVX2.abi3.so"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/libc.so.6\n")
    assert loaded_kernel_library(maps) is None
    assert loaded_kernel_library(tmp_path / "absent") is None


def test_without_vllm_the_probe_has_no_answer() -> None:
    # The training environment has no vLLM: the serve environment answers when it serves.
    assert capability.w4a16_kernel() is None


@pytest.fixture
def awq_run(tmp_path: Path):
    from ftpipe.core.runs import Project, new_run

    project = Project(tmp_path, tmp_path / "prepared", tmp_path / "outputs", tmp_path / "logs")
    run = new_run(project, "r")
    run.awq.mkdir(parents=True)
    (run.awq / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "quantization_config": W4A16}))
    return run


PROBES = {
    "AVX-512": KernelProbe(True, "_C.abi3.so", "vLLM's CPU kernels here (_C.abi3.so) have torch.ops._C.cpu_gemm_wna16"),
    "AVX2": KernelProbe(False, "_C_AVX2.abi3.so", "vLLM's CPU kernels here (_C_AVX2.abi3.so) lack torch.ops._C.cpu_gemm_wna16"),
}


@pytest.mark.parametrize("cpu", list(PROBES))
def test_serving_awq_depends_on_the_probe_alone(awq_run, monkeypatch, cpu) -> None:
    from ftpipe.serve.serve import servable_here

    monkeypatch.setattr(capability, "w4a16_kernel", lambda: PROBES[cpu])
    served = Served("awq", "vllm", str(awq_run.awq), "r", awq_run.manifest_path("convert-awq"), awq_run.awq)
    refusal = servable_here(served, awq_run)
    if PROBES[cpu].available:
        assert refusal is None
        return
    assert isinstance(refusal, InputError) and refusal.exit_code == 2
    line = refusal.one_line()
    assert "outputs/r/awq is a 4-bit weight-only (W4A16) model and this CPU cannot run it in vLLM" in line
    assert "(_C_AVX2.abi3.so) lack torch.ops._C.cpu_gemm_wna16" in line
    assert "(next: ftpipe serve --run r --artifact merged; or ftpipe export-gguf --run r --set gguf.outtypes='[q4_k_m]' " \
           "and ftpipe serve --run r --artifact gguf --set serve.gguf_type=q4_k_m)" in line


def test_unquantized_and_llama_cpp_artifacts_never_ask(awq_run, monkeypatch) -> None:
    from ftpipe.serve.serve import servable_here

    asked = []
    monkeypatch.setattr(capability, "w4a16_kernel", lambda: asked.append(1) or PROBES["AVX2"])
    awq_run.merged.mkdir(parents=True)
    (awq_run.merged / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    merged = Served("merged", "vllm", str(awq_run.merged), "r", awq_run.manifest_path("export-merged"), awq_run.merged)
    gguf = Served("gguf", "llama.cpp", str(awq_run.path / "gguf/model-q4_k_m.gguf"), "r", awq_run.manifest_path("export-gguf"), None)
    assert servable_here(merged, awq_run) is None and servable_here(gguf, awq_run) is None
    assert not asked


VLLM_LOG = """\
(APIServer pid=1) INFO 12-07 00:04:40 [api_server.py:1] Starting vLLM API server
(Worker pid=3) ERROR 12-07 00:04:52 [multiproc_executor.py:1063] Traceback (most recent call last):
(Worker pid=3) ERROR 12-07 00:04:52 [multiproc_executor.py:1063]   File "/v/torch/_ops.py", line 1392, in __getattr__
(Worker pid=3) ERROR 12-07 00:04:52 [multiproc_executor.py:1063]     raise AttributeError(
(Worker pid=3) ERROR 12-07 00:04:52 [multiproc_executor.py:1063] AttributeError: '_OpNamespace' '_C' object has no attribute 'cpu_gemm_wna16'
(EngineCore pid=2) ERROR 12-07 00:04:52 [core.py:1512] RuntimeError: Worker failed with error ''_OpNamespace' '_C' object has no attribute 'cpu_gemm_wna16'', please check the stack trace above for the root cause
(APIServer pid=1) ERROR 12-07 00:04:52 [async_llm.py:906] vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue. See stack trace (above) for the root cause.
INFO:     127.0.0.1:47032 - "POST /v1/chat/completions HTTP/1.1" 500 Internal Server Error
"""


def test_root_cause_is_the_first_error_of_the_failure(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    old = "Traceback (most recent call last):\nValueError: yesterday's failure\n" + "INFO: ok\n" * 500
    log.write_text(old + VLLM_LOG)
    cause = "AttributeError: '_OpNamespace' '_C' object has no attribute 'cpu_gemm_wna16'"
    assert root_cause(log) == cause  # no marker: the last failure's first exception line
    assert root_cause(log, since=len(old)) == cause  # what was written since the marker
    log.write_text(old)
    assert root_cause(log, since=len(old)) is None  # nothing new: no cause of today's failure
    assert root_cause(log) == "ValueError: yesterday's failure"
    assert root_cause(tmp_path / "absent") is None
    (tmp_path / "quiet.log").write_text("INFO: started\nINFO: serving\n")
    assert root_cause(tmp_path / "quiet.log") is None
