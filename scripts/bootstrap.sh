#!/usr/bin/env bash
# Create (or reuse) the stage environments from their lock files:
#   bash scripts/bootstrap.sh [all | stages | train awq serve gguf labelstudio]
# all: every requirements/*.lock (the tests); stages: all but the test-only ones (the demo).
# (labelstudio: the Label Studio server the tests start, not a stage environment; docs/setup.md)
# A venv is reused when its recorded hash of (lock file + scripts/post-install-<env>.sh) matches;
# otherwise it is rebuilt from scratch.
# ftpipe itself is installed editable, so code changes need no rebuild.
# torch is pinned to the 2.13.0 CPU wheel first: an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ $# -eq 0 ] && set -- train
if [ "$1" = all ]; then set -- $(ls requirements/*.lock | xargs -n1 basename | sed 's/\.lock$//' | sort); fi
TEST_ONLY="labelstudio"
if [ "$1" = stages ]; then set -- $(ls requirements/*.lock | xargs -n1 basename | sed 's/\.lock$//' | grep -vxF "$TEST_ONLY" | sort); fi

# pip, with the machine's noisy "Location ... is ignored" index warnings filtered; its exit code is kept.
pipq() { "$dir/bin/pip" install -q --disable-pip-version-check "$@" 2> >(grep -v '^WARNING: Location' >&2); }

venv_dir() { case "$1" in train) echo .venv ;; *) echo ".venv-$1" ;; esac; }

for env in "$@"; do
  lock="requirements/$env.lock"
  [ -f "$lock" ] || { echo "bootstrap: no lock file $lock" >&2; exit 2; }
  dir=$(venv_dir "$env")
  want=$(cat "$lock" $(ls "scripts/post-install-$env.sh" 2>/dev/null) | sha256sum | cut -d' ' -f1)
  if [ -f "$dir/.ftpipe-lock" ] && [ "$(cat "$dir/.ftpipe-lock")" = "$want" ]; then
    echo "bootstrap: $dir up to date"
    continue
  fi
  echo "bootstrap: building $dir from $lock"
  started=$(date +%s)
  rm -rf "$dir"
  "$PYTHON" -m venv "$dir"
  echo $$ > "$dir/.ftpipe-building"  # ftpipe print-runtime: "building" while this runs, "incomplete" if it stops
  if grep -q '^torch==' "$lock"; then
    pipq "$(grep '^torch==' "$lock")"
  fi
  # "# build-env: NAME=VALUE" lines of a lock: build settings for its sdists (gguf: llama.cpp's CMake
  # flags), exported while it installs; they are part of the lock, so changing one rebuilds the venv.
  build_env=$(sed -n 's/^# build-env: //p' "$lock")
  if [ -n "$build_env" ]; then echo "bootstrap: building sdists with $build_env"; fi
  # shellcheck disable=SC2086 # NAME=VALUE words
  env $build_env "$dir/bin/pip" install -q --disable-pip-version-check -r "$lock" 2> >(grep -v '^WARNING: Location' >&2)
  pipq --no-deps -e .
  if [ -f "scripts/post-install-$env.sh" ]; then bash "scripts/post-install-$env.sh" "$dir"; fi
  "$dir/bin/python" -c "import ftpipe" # fail here, not in the middle of a test run
  echo "$want" > "$dir/.ftpipe-lock"
  rm -f "$dir/.ftpipe-building"
  echo "bootstrap: $dir built in $(( $(date +%s) - started )) s"
done
