#!/usr/bin/env bash
# Create (or reuse) the stage environments from their lock files: bash scripts/bootstrap.sh [train awq serve gguf]
# A venv is reused when its recorded hash of (lock file + this script) matches; otherwise rebuilt.
# ftpipe itself is installed editable, so code changes need no rebuild.
# torch is pinned to the 2.13.0 CPU wheel first: an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ $# -eq 0 ] && set -- train

venv_dir() { case "$1" in train) echo .venv ;; *) echo ".venv-$1" ;; esac; }

for env in "$@"; do
  lock="requirements/$env.lock"
  [ -f "$lock" ] || { echo "bootstrap: no lock file $lock" >&2; exit 2; }
  dir=$(venv_dir "$env")
  want=$(cat "$lock" scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)
  if [ -f "$dir/.ftpipe-lock" ] && [ "$(cat "$dir/.ftpipe-lock")" = "$want" ]; then
    echo "bootstrap: $dir up to date"
    continue
  fi
  echo "bootstrap: building $dir from $lock"
  rm -rf "$dir"
  "$PYTHON" -m venv "$dir"
  "$dir/bin/pip" install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
  if grep -q '^torch==' "$lock"; then
    "$dir/bin/pip" install -q "$(grep '^torch==' "$lock")" 2>&1 | grep -v '^WARNING: Location' || true
  fi
  "$dir/bin/pip" install -q -r "$lock" 2>&1 | grep -v '^WARNING: Location' || true
  "$dir/bin/pip" install -q --no-deps -e . 2>&1 | grep -v '^WARNING: Location' || true
  if [ -x "scripts/post-install-$env.sh" ]; then bash "scripts/post-install-$env.sh" "$dir"; fi
  "$dir/bin/python" -c "import ftpipe" # fail here, not in the middle of a test run
  echo "$want" > "$dir/.ftpipe-lock"
done
