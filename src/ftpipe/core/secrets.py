"""Secret redaction: tokens and API keys never reach a log, manifest, report or console file.

Config fields typed `SecretStr` are registered when the config loads; well-known environment
variables (HF_TOKEN, API keys...) are registered too. Every ftpipe log handler and the console tee
pass text through `redact`.
"""

from __future__ import annotations

import logging
import os
import re

REDACTED = "***"

# Environment variables whose values are credentials wherever they appear.
SECRET_ENV_VARS = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "OPENAI_API_KEY",
    "VLLM_API_KEY",
    "FTPIPE_API_KEY",
    "LABEL_STUDIO_API_KEY",
    "LABEL_STUDIO_TOKEN",
    "WANDB_API_KEY",
)
_SECRET_NAME = re.compile(r"(TOKEN|API_KEY|SECRET|PASSWORD)", re.IGNORECASE)

_secrets: set[str] = set()


def register_secret(value: str | None) -> None:
    """Remember `value` so that `redact` removes it everywhere (values under 4 chars are ignored)."""
    if value and len(value) >= 4:
        _secrets.add(value)


def register_env_secrets(environ: dict[str, str] | None = None) -> None:
    """Register the values of credential-looking environment variables (FTPIPE_*, HF_TOKEN...)."""
    env = os.environ if environ is None else environ
    for name, value in env.items():
        if name in SECRET_ENV_VARS or (name.startswith("FTPIPE") and _SECRET_NAME.search(name)):
            register_secret(value)


def redact(text: str) -> str:
    """Return `text` with every registered secret replaced by `***`."""
    for secret in sorted(_secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


class RedactingFilter(logging.Filter):
    """Logging filter that redacts the fully formatted message of each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _secrets:
            message = record.getMessage()
            clean = redact(message)
            if clean != message:
                record.msg, record.args = clean, None
        return True
