# The `train` environment on a CUDA machine (Compose service `sft`): preprocess, finetune, merge,
# eval, report. The project is bind-mounted at /workspace at run time (docker-compose.yml), so the
# image holds dependencies only: no `COPY . .` that a mount would shadow with stale code.
#   docker compose build sft && docker compose run --rm sft ftpipe finetune-sft --config config.yaml
# Versions: requirements/cuda/train.lock = requirements/train.lock (what the tests ran) with torch's
# CUDA build from PyPI (CUDA 13 wheels: NVIDIA driver >= 580) and bitsandbytes for finetune.method=qlora
# (docs/compose.md, "Pinned images"). Base: the local venvs' Python (3.11) without a torch of its own;
# pytorch/pytorch would bring a second, older torch under the lock's.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/workspace/.cache/huggingface \
    MPLCONFIGDIR=/tmp/matplotlib

WORKDIR /opt/ftpipe
COPY requirements/cuda/train.lock requirements/cuda/train.lock
RUN pip install -r requirements/cuda/train.lock \
 && python -c "import torch, transformers, trl, peft, accelerate, datasets; print('train env ok', torch.__version__, transformers.__version__)"
# Only the metadata needed for the `ftpipe` command; the source comes from the mount. No build
# isolation: the build backend is the lock's setuptools, not whatever PyPI has that day.
COPY pyproject.toml README.md ./
COPY src/ftpipe/__init__.py src/ftpipe/__init__.py
RUN pip install --no-deps --no-build-isolation -e /opt/ftpipe

# The mounted source wins: ftpipe is imported from /workspace/src, never from a baked-in copy.
ENV PYTHONPATH=/workspace/src
WORKDIR /workspace
# Runs as the host user (compose `user:`); make the caches writable for any UID.
RUN mkdir -p /tmp/matplotlib && chmod 1777 /tmp/matplotlib
ENTRYPOINT []
CMD ["ftpipe", "--help"]
