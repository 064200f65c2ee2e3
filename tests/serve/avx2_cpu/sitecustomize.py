"""Make this Python process see an AVX2-only x86 CPU (PYTHONPATH=tests/serve/avx2_cpu).

For the serve tests on a machine with AVX-512: torch's CPU-capability queries answer False for
AVX-512, AVX-512 bf16, AMX and VNNI, so vLLM loads and dispatches exactly as on an AVX2-only CPU
(`vllm._C_AVX2`, whose kernels lack the W4A16 GEMM). ftpipe's probe
(`ftpipe.serve.capability.w4a16_kernel`) then finds what it finds on such a CPU, and a vLLM
started with it fails AWQ requests the way it does there. On an AVX2-only machine it changes
nothing. The variable reaches vLLM's engine and worker processes through their environment.
"""

import torch.cpu

for _name in ("_is_avx512_supported", "_is_avx512_bf16_supported", "_is_amx_tile_supported",
              "_is_amx_fp16_supported", "_is_vnni_supported"):
    setattr(torch.cpu, _name, lambda: False)
