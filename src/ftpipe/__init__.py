"""ftpipe: a local, Docker-first LoRA fine-tuning pipeline.

Stages (one module each, one CLI command each) turn raw data into an evaluated, compressed and
served model, writing one run folder per run. Start at `src/ftpipe/cli/main.py`.
"""

__version__ = "0.1.0"
