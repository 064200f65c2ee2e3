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
# OpenMP threads that wait for work sleep instead of spinning: two workers each running torch on both
# cores then share them instead of burning each other's time (bench/omp_wait_policy.py: alone the same
# speed; two at once 2.00x the time alone instead of 2.82x).
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
# Two workers (pytest-xdist) on any machine: the suite needs about 57 CPU-minutes, which one process
# spread over 55 minutes on 2 cores (interpreter starts, server start-ups, single-threaded steps) and
# two workers over 33 (docs/setup.md). Each test file is one unit of work,
# the longest first (tests/conftest.py). FTPIPE_TEST_WORKERS=0 runs everything in this process.
exec .venv/bin/python -m pytest -n "${FTPIPE_TEST_WORKERS:-2}" "$@"
