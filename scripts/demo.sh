#!/usr/bin/env bash
# The main job (README): set up the environments, then run the CPU demo pipeline on the tiny model.
# The training environment is built first (seconds from uv's cache); the other stage environments
# build in the background while the first stages run (logs/bootstrap/<env>.log), and a stage that
# needs one waits for it. `ftpipe print-runtime` shows each environment's state.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh train
bash scripts/bootstrap.sh --background stages  # the stage environments (not the tests' Label Studio server)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/ftpipe demo "$@"
