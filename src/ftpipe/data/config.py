"""Config sections `data` (which dataset) and `preprocess` (how to prepare it).

Owned by the preprocess stage (`ftpipe/data/preprocess_sft.py`); nested into the root config
(`ftpipe/config.py`) by the stage table (`ftpipe/stages.py`). Imports only pydantic so `ftpipe --help` stays instant.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr

from ftpipe.core.configbase import Section

DatasetFormat = Literal[
    "auto",
    "alpaca",
    "messages",
    "sharegpt",
    "prompt_completion",
    "text",
    "csv",
    "parquet",
    "label_studio",
    "label_studio_api",
]


class LabelStudioConfig(Section):
    """A Label Studio project read over its API (format `label_studio_api`)."""

    url: str | None = Field(None, description="Label Studio base URL, e.g. http://127.0.0.1:8080.")
    project_id: int | None = Field(None, description="Project id to export.")
    token: SecretStr | None = Field(
        None,
        description="Legacy API token or personal access token (JWT refresh token); prefer the "
        "LABEL_STUDIO_API_KEY environment variable. Never logged.",
    )
    annotation: Literal["ground_truth", "latest"] = Field(
        "ground_truth", description="Which annotation to use when a task has several."
    )
    prompt_field: str = Field("prompt", description="Task data field holding the prompt.")
    answer_from_name: str | None = Field(
        None, description="`from_name` of the textarea holding the answer; default: the first textarea."
    )


class DataConfig(Section):
    """The dataset to prepare."""

    name: str = Field("dataset", description="Dataset name: output goes to prepared/<name>/.")
    source: str | None = Field(None, description="Input file (relative to the project root).")
    format: DatasetFormat = Field("auto", description="Input format; `auto` detects it.")
    val_source: str | None = Field(None, description="Optional separate validation file.")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Column mapping for CSV/Parquet, e.g. {instruction: question, output: answer}.",
    )
    label_studio: LabelStudioConfig = Field(
        default_factory=LabelStudioConfig, description="Label Studio source settings."
    )


class PreprocessConfig(Section):
    """How `preprocess-sft` validates, filters, splits and measures the dataset."""

    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Fraction of rows held out for val.")
    seed: int = Field(42, description="Seed of the deterministic train/val split and sampling.")
    max_length: int = Field(2048, gt=0, description="Token budget per rendered conversation.")
    overlength: Literal["drop", "truncate"] = Field(
        "drop", description="What to do with rows over max_length."
    )
    dedupe: bool = Field(True, description="Drop exact duplicate conversations.")
    limit: int | None = Field(None, gt=0, description="Keep at most this many rows (after filtering).")
    sample: bool = Field(
        False, description="With `limit`: keep a seeded random sample of the rows instead of the first ones."
    )
    fast_render: bool = Field(
        True,
        description="Count tokens from a per-shape skeleton of the chat template (verified against "
        "Jinja on the first rows of each shape and periodically); false renders every row with Jinja.",
    )
    strict: bool = Field(False, description="Fail on the first bad row instead of dropping it.")
    workers: int | None = Field(
        None, ge=0, le=64,
        description="Worker processes that parse and count tokens (the output is the same whatever the "
        "number); null = for files of 16 MiB or more on 3+ cores, one per core but one (up to 4), else none; "
        "0 = in-process.",
        json_schema_extra={"in_hash": False},
    )
    errors_shown: int = Field(10, ge=0, description="How many bad rows to print (all are counted).")
