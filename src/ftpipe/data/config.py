"""Config sections `data` (which dataset) and `preprocess` (how to prepare it), and `preference`
(the preference pairs of `preprocess-dpo`).

Owned by the preprocess stages (`ftpipe/data/preprocess_sft.py`, `preprocess_dpo.py`); nested into the root config
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
    "label_studio_min",
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


class ShareGPTTags(Section):
    """LLaMA-Factory's sharegpt `tags`: which keys and speaker names a turn uses."""

    role_tag: str = Field("from", description="Key of a turn holding the speaker.")
    content_tag: str = Field("value", description="Key of a turn holding the text.")
    user_tag: str = Field("human", description="Speaker name of user turns.")
    assistant_tag: str = Field("gpt", description="Speaker name of assistant turns.")
    observation_tag: str = Field("observation", description="Speaker name of tool results.")
    function_tag: str = Field("function_call", description="Speaker name of tool calls (JSON {name, arguments}).")
    system_tag: str = Field("system", description="Speaker name of system turns.")


class DatasetInfoConfig(Section):
    """A LLaMA-Factory `dataset_info.json` entry read directly: its file, format, columns and tags."""

    file: str | None = Field(None, description="Path of dataset_info.json (relative to the project root).")
    entry: str | None = Field(None, description="Name of the entry to read, e.g. alpaca_en_demo.")


class DataConfig(Section):
    """The dataset to prepare."""

    name: str = Field("dataset", description="Dataset name: output goes to prepared/<name>/.")
    source: str | None = Field(None, description="Input file (relative to the project root).")
    format: DatasetFormat = Field("auto", description="Input format; `auto` detects it.")
    val_source: str | None = Field(None, description="Optional separate validation file.")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Field mapping for every format (JSON, JSONL, CSV, Parquet): ftpipe's field name -> "
        "the key or column in the file, e.g. {instruction: question, output: answer}.",
    )
    tags: ShareGPTTags | None = Field(
        None, description="ShareGPT turn keys and speaker names (LLaMA-Factory `tags`); unset: from/value, "
        "human/gpt/system/observation/function_call.",
    )
    dataset_info: DatasetInfoConfig = Field(
        default_factory=DatasetInfoConfig,
        description="Read a LLaMA-Factory dataset_info.json entry: its file_name (unless data.source is set), "
        "formatting, columns and tags.",
    )
    placeholders: dict[str, str] = Field(
        default_factory=dict,
        description="Values for {{name}}-style placeholders in row texts, e.g. {name: ftpipe, author: me}; "
        "placeholders left unfilled are reported.",
    )
    label_studio: LabelStudioConfig = Field(
        default_factory=LabelStudioConfig, description="Label Studio source settings."
    )


class PreprocessConfig(Section):
    """How `preprocess-sft` validates, filters, splits and measures the dataset."""

    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Fraction of rows held out for val.")
    seed: int = Field(42, description="Seed of the deterministic train/val split and sampling.")
    max_length: int = Field(2048, gt=0, description="Token budget per rendered conversation.")
    overlength: Literal["drop", "truncate", "chunk"] = Field(
        "drop", description="What to do with rows over max_length: drop them, truncate them to whole turns, or "
        "chunk (text rows split into max_length windows; other rows truncated).",
    )
    max_row_bytes: int = Field(
        2**20, gt=0, description="A row bigger than this (bytes of its JSON line / cells) is a row error, "
        "before parsing and tokenization: memory stays bounded per row.",
    )
    tools_fallback: Literal["error", "text"] = Field(
        "error", description="Rows with tools / tool calls under a chat template that does not render them: "
        "`error` (a row error) or `text` (tool definitions, calls and results written into the turns as text).",
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


class PairwiseLabelStudioConfig(Section):
    """Which task fields and result a Label Studio pairwise export (format `label_studio`) uses."""

    prompt_field: str = Field("prompt", description="Task data field holding the prompt.")
    left_field: str = Field(
        "answer1", description="Task data field of the left answer (the first `toName` of the Pairwise tag)."
    )
    right_field: str = Field("answer2", description="Task data field of the right answer.")
    from_name: str | None = Field(
        None, description="`from_name` of the Pairwise result to use; default: the first pairwise result."
    )
    annotation: Literal["ground_truth", "latest"] = Field(
        "ground_truth", description="Which annotation to use when a task has several."
    )


class PreferenceConfig(Section):
    """The preference pairs `preprocess-dpo` reads, validates, measures and splits."""

    name: str = Field("preference", description="Preference set name: output goes to prepared/<name>/.")
    source: str | None = Field(None, description="Input file (relative to the project root).")
    format: Literal["auto", "trl", "sharegpt", "alpaca", "label_studio"] = Field(
        "auto", description="Input format; `auto` detects it from the first valid row."
    )
    val_source: str | None = Field(None, description="Optional separate validation file (same formats).")
    val_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="Fraction of pairs held out for val (when val_source is not set)."
    )
    seed: int = Field(42, description="Seed of the deterministic train/val split.")
    max_length: int = Field(
        2048, gt=0, description="Token budget of a pair: the prompt plus the longer answer, rendered with the "
        "model's chat template; longer pairs are dropped and counted.",
    )
    dedupe: bool = Field(True, description="Drop exact duplicate pairs (same prompt, chosen and rejected).")
    strict: bool = Field(False, description="Fail on the first bad row instead of dropping it.")
    errors_shown: int = Field(10, ge=0, description="How many bad rows to print (all are counted).")
    max_row_bytes: int = Field(
        2**20, gt=0, description="A row bigger than this (bytes of its JSON line / cells) is a row error, "
        "before parsing and tokenization.",
    )
    label_studio: PairwiseLabelStudioConfig = Field(
        default_factory=PairwiseLabelStudioConfig, description="Label Studio pairwise export settings."
    )
