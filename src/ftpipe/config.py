"""The root config: the shared sections plus one section per stage, assembled from the stage table.

`model`, `paths`, `runtime` and `secrets` are shared (ftpipe/core/config.py); `run` is the
pipeline's; every other section is owned by a stage and named in its row of `ftpipe/stages.py`
(`Stage.owns`), so adding a stage adds its section here without editing this file. Loading,
precedence and error reporting are core's (`ftpipe.core.config.load_config`).

    ftpipe print-runtime --config debug_config.yaml --set finetune.max_steps=10
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from pydantic import Field, create_model

from ftpipe.core import config as core_config
from ftpipe.core.config import LoadedConfig, ModelConfig, PathsConfig, RuntimeConfig, SecretsConfig
from ftpipe.core.configbase import Section
from ftpipe.stages import DEFAULT_STAGES, STAGES


class RunConfig(Section):
    """What `ftpipe run` does."""

    name: str | None = Field(None, description="Run name; default run-<model>-<data>-<n>.")
    stages: list[str] = Field(
        default_factory=lambda: list(DEFAULT_STAGES),
        description="Stages `ftpipe run` executes, in pipeline order.",
    )


def _model(path: str) -> type[Section]:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def _stage_sections() -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for stage in STAGES:
        for section in stage.owns:
            model = _model(section.model)
            fields[section.name] = (model, Field(default_factory=model, description=section.description))
    return fields


_SECTIONS = _stage_sections()
Config = create_model(
    "Config",
    __base__=Section,
    __doc__="The root config: model, data, paths, runtime, run, secrets and one section per stage.",
    model=(ModelConfig, Field(description="The base model.")),
    data=_SECTIONS.pop("data"),  # second, as in config.yaml: what to fine-tune on
    paths=(PathsConfig, Field(default_factory=PathsConfig, description="Folders.")),
    runtime=(RuntimeConfig, Field(default_factory=RuntimeConfig, description="Environments.")),
    run=(RunConfig, Field(default_factory=RunConfig, description="`ftpipe run`.")),
    secrets=(SecretsConfig, Field(default_factory=SecretsConfig, description="Credentials.")),
    **_SECTIONS,
)


def load_config(path: Path | None, *args: Any, **kwargs: Any) -> LoadedConfig:
    """Load, merge and validate the root config: `ftpipe.core.config.load_config` with this schema
    (overrides, environ, flags as there).

    Raises:
        ConfigError: listing every invalid key with its origin (file:line, env var or --set).
    """
    return core_config.load_config(Config, path, *args, **kwargs)
