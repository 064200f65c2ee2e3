"""Pipeline stage selection (the end-to-end runs are in tests/e2e/)."""

from __future__ import annotations

import pytest

from ftpipe.core.errors import ConfigError
from ftpipe.core.pipeline import ORDER, select_stages


def test_order_and_slicing() -> None:
    configured = ["report", "finetune-sft", "preprocess-sft", "export-merged"]
    assert select_stages(configured, None, None) == ["preprocess-sft", "finetune-sft", "export-merged", "report"]
    assert select_stages(configured, "finetune-sft", None) == ["finetune-sft", "export-merged", "report"]
    assert select_stages(configured, None, "export-merged") == ["preprocess-sft", "finetune-sft", "export-merged"]
    assert select_stages(ORDER, "serve", "serve") == ["serve"]


def test_bad_stage_names() -> None:
    with pytest.raises(ConfigError, match=r"run.stages: unknown stage\(s\) finetune"):
        select_stages(["finetune"], None, None)
    with pytest.raises(ConfigError, match=r"--from convert-awq: not one of the run's stages"):
        select_stages(["preprocess-sft", "finetune-sft"], "convert-awq", None)
    with pytest.raises(ConfigError, match=r"--to bogus"):
        select_stages(["preprocess-sft"], None, "bogus")
