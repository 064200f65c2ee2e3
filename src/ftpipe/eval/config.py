"""Config sections `eval` (eval-sft) and `report`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ftpipe.core.configbase import Section


class EvalConfig(Section):
    """`eval-sft`: perplexity and prompt checks per artifact."""

    artifacts: list[Literal["base", "adapter", "merged", "awq"]] = Field(
        default_factory=lambda: ["base", "adapter", "merged", "awq"],
        description="Artifacts to evaluate (those that exist).",
    )
    prompts_file: str | None = Field(None, description="YAML file of prompt checks.")
    max_val_rows: int | None = Field(None, gt=0, description="Limit val rows for perplexity.")
    max_new_tokens: int = Field(32, gt=0, description="Tokens generated per prompt (greedy).")


class ReportConfig(Section):
    """`report`: the one-page HTML report."""

    title: str | None = Field(None, description="Report title; default: the run name.")
