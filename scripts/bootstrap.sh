#!/usr/bin/env bash
# Create (or reuse) the stage environments from their lock files, with uv:
#   bash scripts/bootstrap.sh [--background] [all | stages | train awq serve gguf labelstudio]
# all: every requirements/*.lock (the tests); stages: all but the test-only ones (the demo).
# (labelstudio: the Label Studio server the tests start, not a stage environment; docs/setup.md)
# --background: each environment that needs building is built by its own process (output in
#   logs/bootstrap/<env>.log; one that compiles, at the lowest CPU priority) and this returns at
#   once; a stage that needs one waits for it (ftpipe's executor), `ftpipe print-runtime` shows
#   it as "building".
# A venv is reused when its recorded hash of (lock file + scripts/post-install-<env>.sh) matches;
# otherwise it is rebuilt from scratch.
# ftpipe itself is installed editable, so code changes need no rebuild.
# uv (UV_VERSION below, installed into .uv/ by pip) installs each lock with the indexes pip is
# configured with (`pip config list`: index-url, extra-index-url, find-links, constraint, cert) and,
# like pip, takes the best matching version across them. Its cache (~/.cache/uv, or UV_CACHE_DIR)
# is shared by every environment and checkout: a package downloaded once is linked from it (a wheel
# compiled with a lock's config settings only within one checkout: @REPO@ is part of its cache key).
# torch: the lock pins torch==2.13.0; where a CPU build of it is on an index (`2.13.0+cpu`) it wins,
# as with pip. A plain PyPI index alone gives the CUDA build: see docs/setup.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
UV_VERSION=0.13.9
background=0
if [ "${1:-}" = --background ]; then background=1; shift; fi
[ $# -eq 0 ] && set -- train
if [ "$1" = all ]; then set -- $(ls requirements/*.lock | xargs -n1 basename | sed 's/\.lock$//' | sort); fi
TEST_ONLY="labelstudio"
if [ "$1" = stages ]; then set -- $(ls requirements/*.lock | xargs -n1 basename | sed 's/\.lock$//' | grep -vxF "$TEST_ONLY" | sort); fi

venv_dir() { case "$1" in train) echo .venv ;; *) echo ".venv-$1" ;; esac; }
lock_hash() { cat "requirements/$1.lock" $(ls "scripts/post-install-$1.sh" 2>/dev/null) | sha256sum | cut -d' ' -f1; }
up_to_date() { local dir; dir=$(venv_dir "$1"); [ -f "$dir/.ftpipe-lock" ] && [ "$(cat "$dir/.ftpipe-lock")" = "$(lock_hash "$1")" ]; }
# The pid of a live bootstrap.sh building the environment now (its venv's .ftpipe-building); fails if none.
builder() { local pid; pid=$(cat "$(venv_dir "$1")/.ftpipe-building" 2>/dev/null) && kill -0 "$pid" 2>/dev/null && echo "$pid"; }

# uv itself, pinned, in its own small venv (pip, from the same indexes as everything else).
UV=.uv/bin/uv
if [ ! -x "$UV" ] || [ "$("$UV" --version 2>/dev/null | cut -d' ' -f2)" != "$UV_VERSION" ]; then
  echo "bootstrap: installing uv $UV_VERSION into .uv/"
  rm -rf .uv
  "$PYTHON" -m venv .uv
  .uv/bin/pip install -q --disable-pip-version-check "uv==$UV_VERSION" 2> >(grep -v '^WARNING: Location' >&2)
fi

if [ "$background" = 1 ]; then
  mkdir -p logs/bootstrap
  for env in "$@"; do
    [ -f "requirements/$env.lock" ] || { echo "bootstrap: no lock file requirements/$env.lock" >&2; exit 2; }
    dir=$(venv_dir "$env")
    if up_to_date "$env"; then echo "bootstrap: $dir up to date"; continue; fi
    if pid=$(builder "$env"); then echo "bootstrap: $dir is already being built (pid $pid)"; continue; fi
    # One that compiles an sdist (a `# config-settings:` line: llama.cpp, minutes of CPU) gets what the
    # running stages leave (nice 19); the others are seconds of work, needed soon: normal priority.
    niceness=0
    if grep -q '^# config-settings: ' "requirements/$env.lock"; then niceness=19; fi
    nohup nice -n "$niceness" bash scripts/bootstrap.sh "$env" > "logs/bootstrap/$env.log" 2>&1 < /dev/null &
    pid=$!
    # Return only once the build has marked its venv, so a stage that looks never sees the old one.
    for _ in $(seq 300); do
      if [ -f "$dir/.ftpipe-building" ] && [ "$(cat "$dir/.ftpipe-building")" = "$pid" ]; then break; fi
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    echo "bootstrap: building $dir in the background (pid $pid, log: logs/bootstrap/$env.log)"
  done
  exit 0
fi

# pip's configured indexes -> uv options (uv does not read pip.conf / PIP_* variables itself); read
# once, when the first environment needs building.
UV_ARGS=()
uv_args() {
  local UV_INDEX_ARGS arg
  mapfile -t UV_INDEX_ARGS < <(.uv/bin/python -m pip config list 2>/dev/null | .uv/bin/python scripts/pip_config_to_uv.py)
  UV_ARGS=(--index-strategy unsafe-best-match)
  for arg in "${UV_INDEX_ARGS[@]}"; do
    case "$arg" in
      --cert=*) export SSL_CERT_FILE="${SSL_CERT_FILE:-${arg#--cert=}}" ;;
      *) UV_ARGS+=("$arg") ;;
    esac
  done
}

for env in "$@"; do
  lock="requirements/$env.lock"
  [ -f "$lock" ] || { echo "bootstrap: no lock file $lock" >&2; exit 2; }
  dir=$(venv_dir "$env")
  if pid=$(builder "$env"); then
    # Another bootstrap.sh (demo.sh's --background one) is building it: wait, do not pull it away.
    echo "bootstrap: $dir is being built by pid $pid (logs/bootstrap/$env.log); waiting for it"
    while kill -0 "$pid" 2>/dev/null; do sleep 2; done
  fi
  if up_to_date "$env"; then
    echo "bootstrap: $dir up to date"
    continue
  fi
  echo "bootstrap: building $dir from $lock"
  [ ${#UV_ARGS[@]} -gt 0 ] || uv_args
  started=$(date +%s)
  rm -rf "$dir"
  mkdir -p "$dir"
  echo $$ > "$dir/.ftpipe-building"  # ftpipe print-runtime: "building" while this runs, "incomplete" if it stops
  # --seed: pip inside the venv (post-install steps, `pip download` of a model family's files).
  "$UV" venv -q --allow-existing --seed --python "$PYTHON" "$dir"
  # "# config-settings: PACKAGE:KEY=VALUE" lines of a lock: settings for the build backend of an
  # sdist it compiles (gguf: llama.cpp's CMake flags); @REPO@ is this checkout. uv keys its cache of
  # built wheels on them, and they are part of the lock, so changing one rebuilds the venv.
  settings=()
  while IFS= read -r value; do
    settings+=(--config-settings-package "${value//@REPO@/$PWD}")
  done < <(sed -n 's/^# config-settings: //p' "$lock")
  if [ ${#settings[@]} -gt 0 ]; then echo "bootstrap: compiling sdists with ${settings[*]//$PWD/@REPO@}"; fi
  "$UV" pip install -q --python "$dir/bin/python" "${UV_ARGS[@]}" "${settings[@]}" -r "$lock"
  "$UV" pip install -q --python "$dir/bin/python" "${UV_ARGS[@]}" --no-deps -e .
  # .pyc files, as pip and `uv pip install --compile-bytecode` make them: without them (or with
  # PYTHONDONTWRITEBYTECODE set) every start of a stage would compile its imports again (vLLM,
  # llm-compressor: 10+ s each). Those of sources the finished environments share (torch,
  # transformers, ...: the same files, linked from uv's cache) are linked from them, not compiled again.
  "$dir/bin/python" scripts/share_bytecode.py "$dir" $(for other in $(ls requirements/*.lock | xargs -n1 basename | sed 's/\.lock$//'); do venv_dir "$other"; done)
  if [ -f "scripts/post-install-$env.sh" ]; then bash "scripts/post-install-$env.sh" "$dir"; fi
  "$dir/bin/python" -c "import ftpipe" # fail here, not in the middle of a test run
  lock_hash "$env" > "$dir/.ftpipe-lock"
  # The line first, then the marker: whoever waits on the marker (wait_for_build) finds the log complete.
  echo "bootstrap: $dir built in $(( $(date +%s) - started )) s"
  rm -f "$dir/.ftpipe-building"
done
