# Included at llama.cpp's project() call when llama-cpp-python is compiled (requirements/gguf.lock's
# config-settings line, CMAKE_PROJECT_llama.cpp_INCLUDE): llama-cpp-python forces llama.cpp's
# `common` library on, which only its multimodal (mtmd) library links and no stage loads. Without it
# the compile is 74 units instead of 127 (measured on 2 cores: about 110 s instead of 220 s).
set(LLAMA_BUILD_COMMON OFF CACHE BOOL "llama.cpp: common library (not used by the llama_cpp package)" FORCE)

# A portable x86-64 build instead of llama.cpp's default -march=native, for two reasons seen here:
# - uv caches the compiled wheel by package and config-settings, not by CPU, and these machines
#   differ between sessions (AVX-512 + AMX on one, AVX2 only on another): a native build from one
#   dies with SIGILL on the other;
# - on a CPU with AMX, -march=native compiles llama.cpp's AMX path, which repacks q8_0 weights and
#   crashed (SIGSEGV in llama_decode) on the tiny models' 128-wide matrices, failing export-gguf's
#   check and GGUF serving. The AVX2/FMA/F16C baseline runs on every machine of this project.
# On x86 only: other processors keep llama.cpp's defaults.
if(CMAKE_SYSTEM_PROCESSOR MATCHES "^(x86_64|AMD64|amd64)$")
  set(GGML_NATIVE OFF CACHE BOOL "ftpipe: portable build" FORCE)
  foreach(_ftpipe_feature GGML_SSE42 GGML_AVX GGML_AVX2 GGML_FMA GGML_F16C GGML_BMI2)
    set(${_ftpipe_feature} ON CACHE BOOL "ftpipe: x86-64 AVX2 baseline" FORCE)
  endforeach()
  foreach(_ftpipe_feature GGML_AVX512 GGML_AVX512_VBMI GGML_AVX512_VNNI GGML_AVX512_BF16 GGML_AMX_TILE GGML_AMX_INT8 GGML_AMX_BF16)
    set(${_ftpipe_feature} OFF CACHE BOOL "ftpipe: x86-64 AVX2 baseline" FORCE)
  endforeach()
endif()

# llama.cpp's own library `llama` (model loader, vocabulary, grammar, sampler, KV cache and the graph
# builders of ~150 architectures) at -O1: it is about three quarters of the compile's CPU time and
# none of the arithmetic, which is ggml's (its CPU kernels keep -O3). Measured on 2 cores: 182 CPU
# seconds as -O3, 136 with `llama` at -O1 (docs/setup.md). Deferred to the end of llama.cpp's
# top-level CMakeLists.txt, where the target exists; a compile option comes after the build type's
# -O3 on the command line, so it wins.
function(_ftpipe_llama_at_o1)
  if(TARGET llama AND NOT MSVC)
    target_compile_options(llama PRIVATE -O1)
  endif()
endfunction()
cmake_language(DEFER CALL _ftpipe_llama_at_o1)
