# Included at llama.cpp's project() call when llama-cpp-python is compiled (requirements/gguf.lock's
# config-settings line, CMAKE_PROJECT_llama.cpp_INCLUDE): llama-cpp-python forces llama.cpp's
# `common` library on, which only its multimodal (mtmd) library links and no stage loads. Without it
# the compile is 74 units instead of 127 (measured on 2 cores: about 110 s instead of 220 s).
set(LLAMA_BUILD_COMMON OFF CACHE BOOL "llama.cpp: common library (not used by the llama_cpp package)" FORCE)
