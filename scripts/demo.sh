#!/usr/bin/env bash
# The main job (README): set up the environments, then run the CPU demo pipeline on the tiny model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh stages  # the stage environments (not the tests' Label Studio server)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/ftpipe demo "$@"
