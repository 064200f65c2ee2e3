#!/usr/bin/env bash
# After bootstrap.sh has installed requirements/gguf.lock into VENV: put llama.cpp's converter
# (convert_hf_to_gguf.py + conversion/ + its own gguf-py) into VENV/share/llama.cpp, taken from
# the sdist of the llama-cpp-python version that is installed, so the converter and the runtime
# that verifies its output come from the same llama.cpp snapshot.
#   bash scripts/post-install-gguf.sh .venv-gguf
# llama-quantize is not compiled by default (another ~10 min on 2 cores): export-gguf makes
# q4_k_m through llama-cpp-python's binding of the same function. FTPIPE_BUILD_LLAMA_QUANTIZE=1
# builds the binary into VENV/bin as well.
set -euo pipefail
venv=$(cd "${1:?usage: post-install-gguf.sh VENV}" && pwd)
version=$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))')
dest="$venv/share/llama.cpp"
origin="llama-cpp-python==$version sdist (vendor/llama.cpp)"
if [ -f "$dest/FTPIPE_ORIGIN" ] && [ "$(cat "$dest/FTPIPE_ORIGIN")" = "$origin" ]; then
  echo "post-install-gguf: converter already in $dest"
else
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  parts=(convert_hf_to_gguf.py conversion gguf-py LICENSE)
  mkdir -p "$work/llama.cpp"
  # uv has just compiled llama-cpp-python from this very sdist and keeps it unpacked in its cache
  # (checked against the index's hash when it was downloaded): copying from there saves a second
  # 77 MB download and pip's build of the sdist's metadata (about 30 s of a first run; docs/setup.md).
  cached=""
  if [ -x .uv/bin/uv ]; then
    for candidate in "$(.uv/bin/uv cache dir 2>/dev/null)"/sdists-v*/pypi/llama-cpp-python/"$version"/*/src/vendor/llama.cpp; do
      if [ -f "$candidate/convert_hf_to_gguf.py" ] && [ -d "$candidate/conversion" ] && [ -d "$candidate/gguf-py" ]; then cached=$candidate; break; fi
    done
  fi
  if [ -n "$cached" ]; then
    echo "post-install-gguf: convert_hf_to_gguf.py from the llama-cpp-python $version sdist in uv's cache"
    for part in "${parts[@]}"; do cp -R "$cached/$part" "$work/llama.cpp/"; done
  else
    echo "post-install-gguf: fetching the llama-cpp-python $version sdist for convert_hf_to_gguf.py"
    "$venv/bin/pip" download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work" 2>&1 | grep -v '^WARNING: Location' || true
    tar -xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work" "${parts[@]/#/llama_cpp_python-$version/vendor/llama.cpp/}"
    rm -rf "$work/llama.cpp"
    mv "$work/llama_cpp_python-$version/vendor/llama.cpp" "$work/llama.cpp"
  fi
  rm -rf "$dest"
  mkdir -p "$(dirname "$dest")"
  mv "$work/llama.cpp" "$dest"
  echo "$origin" > "$dest/FTPIPE_ORIGIN"
  echo "post-install-gguf: converter -> $dest"
fi
if [ "${FTPIPE_BUILD_LLAMA_QUANTIZE:-0}" = 1 ] && [ ! -x "$venv/bin/llama-quantize" ]; then
  work=$(mktemp -d)
  "$venv/bin/pip" download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work"
  tar -xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
  src="$work/llama_cpp_python-$version/vendor/llama.cpp"
  cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null
  cmake --build "$work/build" --target llama-quantize -j "$(nproc)" >/dev/null
  cp "$work/build/bin/llama-quantize" "$venv/bin/llama-quantize"
  rm -rf "$work"
  echo "post-install-gguf: llama-quantize -> $venv/bin/llama-quantize"
else
  command -v llama-quantize >/dev/null || [ -x "$venv/bin/llama-quantize" ] ||
    echo "post-install-gguf: no llama-quantize binary; q4_k_m uses llama_cpp.llama_model_quantize (FTPIPE_BUILD_LLAMA_QUANTIZE=1 builds the binary)"
fi
