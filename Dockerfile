# The `train` environment on a CUDA machine (Compose service `sft`): preprocess, finetune, merge,
# eval, report. The project is bind-mounted at /workspace at run time (docker-compose.yml), so the
# image holds dependencies only: no `COPY . .` that a mount would shadow with stale code.
#   docker compose build sft && docker compose run --rm sft ftpipe finetune-sft --config config.yaml
FROM pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime AS base

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/workspace/.cache/huggingface \
    MPLCONFIGDIR=/tmp/matplotlib

WORKDIR /opt/ftpipe
# Only the metadata needed to resolve dependencies; the source comes from the mount.
COPY pyproject.toml README.md ./
COPY src/ftpipe/__init__.py src/ftpipe/__init__.py
RUN pip install "transformers>=5.0,<6" "trl>=1.16,<2" "peft>=0.21" "accelerate>=1.10" \
        "datasets>=4" "tensorboard>=2.18" "safetensors>=0.5" "tokenizers>=0.22" \
        "typer>=0.15" "rich>=13" "pydantic>=2.7" "pyyaml>=6" bitsandbytes deepspeed \
 && pip install --no-deps -e /opt/ftpipe

# The mounted source wins: ftpipe is imported from /workspace/src, never from a baked-in copy.
ENV PYTHONPATH=/workspace/src
WORKDIR /workspace
# Runs as the host user (compose `user:`); make the caches writable for any UID.
RUN mkdir -p /tmp/matplotlib && chmod 1777 /tmp/matplotlib
ENTRYPOINT []
CMD ["ftpipe", "--help"]
