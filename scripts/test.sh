#!/usr/bin/env bash
# The test command (README, .ci/run): set up every stage environment that has a lock file
# (reused when its lock hash matches), then run the whole suite, slow end-to-end tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh all
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
