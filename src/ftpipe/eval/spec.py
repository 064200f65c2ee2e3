"""The eval spec: what `eval-sft` asks `ftpipe.eval.measure.evaluate_spec` to measure, typed.

`eval-sft` (`ftpipe/eval/eval_sft.py`) builds it from the `eval` config section and the run's
artifacts; the train environment passes it in process, the awq and gguf environments get it as
JSON through `python -m ftpipe.eval.worker`, which validates it with these same models. Imports only
pydantic and ftpipe.core: it loads in every environment.

    .venv-awq/bin/python -m ftpipe.eval.worker --spec outputs/<run>/eval/awq-spec.json --out result.json
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from ftpipe.core.configbase import HandOffFile


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class ArtifactSpec(_Strict):
    """One model to evaluate: `model` (plus the peft `adapter` when given) and its tokenizer."""

    name: str = Field(description="Artifact name: base, adapter, dpo_adapter, merged, awq or gguf_<type>.")
    model: str = Field(description="What from_pretrained loads: a folder or a hub id; for format gguf, the .gguf file.")
    format: Literal["hf", "gguf"] = Field(
        "hf", description="hf: loaded with transformers; gguf: a GGUF file measured with llama-cpp-python "
        "(`ftpipe.eval.gguf`), prompts rendered by `tokenizer`.")
    revision: str | None = Field(None, description="Hub revision of `model` (None for a folder).")
    tokenizer: str = Field(description="Folder or hub id of the tokenizer.")
    adapter: str | None = Field(None, description="peft adapter folder applied on top of `model`.")
    preference: bool = Field(False, description="Also score the spec's preference pairs (preference accuracy).")


class PromptCheck(_Strict):
    """One prompt check, as `ftpipe.handoff.checks.load_checks` validated it."""

    name: str = Field(description="Check name.")
    system: str | None = Field(None, description="System message, if any.")
    prompt: str = Field(description="User message.")
    expect: dict[str, Any] = Field(description="Expectations judged by `ftpipe.handoff.checks.judge`.")


class EvalSpec(HandOffFile):
    """The artifacts to evaluate in one environment and the settings (from the `eval` config)."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())
    what: ClassVar[str] = "eval spec"
    writer: ClassVar[str] = "`ftpipe eval-sft`"

    artifacts: list[ArtifactSpec] = Field(min_length=1, description="Evaluated in this order.")
    environment: str = Field(description="The environment that evaluates them (recorded per artifact).")
    val_file: Path = Field(description="The prepared val split (jsonl of messages rows).")
    max_val_rows: int | None = Field(gt=0, description="eval.max_val_rows.")
    max_length: int = Field(gt=1, description="eval.max_length.")
    batch_tokens: int = Field(gt=0, description="eval.batch_tokens.")
    checks: list[PromptCheck] = Field(description="The checks of eval.prompts_file (may be empty).")
    general: list[PromptCheck] = Field(default_factory=list, description="The checks of eval.general_file (may be empty).")
    max_new_tokens: int = Field(gt=0, description="eval.max_new_tokens.")
    generate_batch_size: int = Field(gt=0, description="eval.generate_batch_size.")
    samples: int = Field(ge=0, description="eval.samples.")
    dtype: str = Field(description="model.dtype: `auto` or a torch dtype name.")
    perplexity_file: Path | None = Field(None, description="eval.perplexity_file: held-out plain text (`ftpipe.eval.text`).")
    pairs_file: Path | None = Field(None, description="Held-out preference pairs (prepared/<preference.name>/val.jsonl).")
    max_pairs: int | None = Field(None, gt=0, description="eval.max_pairs.")
