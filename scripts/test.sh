#!/usr/bin/env bash
# The test command (README, .ci/run): set up every environment that has a lock file (reused when
# its lock hash matches), then run the whole suite, slow end-to-end tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
# Every build at once (llama.cpp compiles at low priority while uv installs the others), then wait
# for each: one that failed in the background is built again here, with its output shown.
bash scripts/bootstrap.sh --background all
bash scripts/bootstrap.sh all
echo "test.sh: environments ready after ${SECONDS} s"
# The report test renders report.html in headless Chromium (Debian package).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null
  else echo "test.sh: install Debian's chromium (sudo apt-get install chromium) for the report test" >&2; fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
