"""Every shipped accelerate config loads with accelerate's own reader and says what it scales to."""

from __future__ import annotations

import pytest

from tests.conftest import REPO

CONFIGS = sorted((REPO / "configs/accelerate").glob("*.yaml"))


def test_the_three_configs_are_shipped():
    assert {p.stem for p in CONFIGS} == {"multi_gpu", "fsdp2", "zero3"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_with_accelerate(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    expected = {"multi_gpu": "MULTI_GPU", "fsdp2": "FSDP", "zero3": "DEEPSPEED"}[path.stem]
    assert str(config.distributed_type).endswith(expected)
    assert config.num_processes == 2 and config.mixed_precision == "bf16"
    if path.stem == "fsdp2":
        assert config.fsdp_config["fsdp_version"] == 2
    if path.stem == "zero3":
        assert config.deepspeed_config["zero_stage"] == 3
    # Every shipped file starts with the command that uses it.
    assert f"--accelerate-config configs/accelerate/{path.name}" in path.read_text().splitlines()[1]
