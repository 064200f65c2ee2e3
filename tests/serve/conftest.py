"""Fixtures for the serve tests (helpers in serve/helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve.helpers import make_answering_model


@pytest.fixture(scope="session")
def answering_model(tiny_qwen_dir, tmp_path_factory) -> Path:
    """The tiny untied Qwen2 rewired to answer "positive" and stop at EOS (see serve/helpers.py)."""
    out = tmp_path_factory.mktemp("answering-model")
    make_answering_model(tiny_qwen_dir, out)
    return out
