"""Config sections `eval` (eval-sft) and `report`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ftpipe.core.configbase import Section


TUNED = ("adapter", "dpo_adapter", "merged")  # what eval.min_tuned_pass_rate / min_general_kept bound


class EvalConfig(Section):
    """`eval-sft`: perplexity and prompt checks per artifact."""

    artifacts: list[Literal["base", "adapter", "dpo_adapter", "merged", "awq", "gguf_f16", "gguf_q8_0", "gguf_q4_k_m"]] = Field(
        default_factory=lambda: ["base", "adapter", "dpo_adapter", "merged", "awq"],
        description="Artifacts to evaluate (those that exist; the others are reported as skipped). "
        "dpo_adapter: finetune-dpo's adapter on the same base. gguf_f16 / gguf_q8_0 / gguf_q4_k_m (not in "
        "the default): export-gguf's outputs/<run>/gguf/model-<type>.gguf measured with llama.cpp in the "
        "gguf environment; asking for one makes `ftpipe run` run eval-sft after export-gguf.",
    )
    prompts_file: str | None = Field(
        None,
        description="YAML or JSON file of prompt checks (name, system, prompt, expect: exact / "
        "contains / regex / max_length / must_stop); relative to the project root. None: no checks.",
    )
    general_file: str | None = Field(
        None,
        description="General-ability checks: a checks file in the format of eval.prompts_file, with "
        "questions unrelated to the task; relative to the project root. Every artifact gets "
        "general_passed / general_total, every artifact but base general_kept (the share of the checks "
        "the base passed that it passes too). None: no general checks.",
    )
    perplexity_file: str | None = Field(
        None,
        description="Held-out plain text (not the training set) for text_perplexity: a UTF-8 text file, "
        "documents separated by blank lines; relative to the project root. Each document is tokenized "
        "without a chat template (the tokenizer's own BOS) and scored in consecutive windows of "
        "eval.max_length tokens (no context across windows). None: no text perplexity.",
    )
    max_val_rows: int | None = Field(None, gt=0, description="Limit val rows for perplexity.")
    max_length: int = Field(
        2048, gt=1, description="Truncate val conversations to this many tokens; the window length of "
        "eval.perplexity_file's text.")
    batch_tokens: int = Field(
        4096, gt=0, description="Token budget per perplexity batch (rows x padded length)."
    )
    max_pairs: int | None = Field(
        None, gt=0, description="Limit the held-out preference pairs (prepared/<preference.name>/val.jsonl) "
        "scored for preference accuracy.",
    )
    max_new_tokens: int = Field(32, gt=0, description="Tokens generated per prompt (greedy).")
    generate_batch_size: int = Field(
        8, gt=0,
        description="Prompts (checks, general checks, samples) generated together in one left-padded batch "
        "for the transformers artifacts (GGUF artifacts: one at a time). Batched float32 greedy decoding can "
        "pick another token than one prompt alone at an exact near-tie (tiny numeric differences); 1: one "
        "prompt at a time, as before.",
    )
    samples: int = Field(
        3, ge=0, description="Greedy sample generations per artifact for the first val rows."
    )
    worker_timeout: float = Field(
        3600.0, gt=0, description="Seconds the awq-environment worker may take before it is stopped."
    )
    max_base_pass_rate: float | None = Field(
        None, ge=0, le=1,
        description="Bound the run must pass: the base model's share of eval.prompts_file's checks passed "
        "must be at most this (the task is not already solved). Needs base in eval.artifacts. None: off.",
    )
    min_tuned_pass_rate: float | None = Field(
        None, ge=0, le=1,
        description="Bound the run must pass: every tuned full-precision artifact evaluated (adapter, "
        "dpo_adapter, merged) must pass at least this share of eval.prompts_file's checks. None: off.",
    )
    min_general_kept: float | None = Field(
        None, ge=0, le=1,
        description="Bound the run must pass: every tuned full-precision artifact evaluated (adapter, "
        "dpo_adapter, merged) must have general_kept (the share of the general checks the base passed "
        "that it passes too) at least this. Needs eval.general_file and base in eval.artifacts. None: off.",
    )
    max_text_perplexity_delta: float | None = Field(
        None, ge=0,
        description="Bound the run must pass: every quantized artifact evaluated (awq, gguf_f16, gguf_q8_0, "
        "gguf_q4_k_m) must have "
        "text_perplexity_delta_vs_merged (its held-out text perplexity's relative increase over merged's) "
        "at most this, e.g. 0.1 for +10%. Needs eval.perplexity_file and merged in eval.artifacts. None: off.",
    )
    lm_eval_tasks: list[str] = Field(
        default_factory=list,
        description="Optional lm-evaluation-harness tasks (local task data) run on the merged "
        "model; needs `pip install lm-eval` in the train environment.",
    )

    @model_validator(mode="after")
    def _bounds_need_their_measure(self):
        """A bound without what it bounds would fail every run after all the work: refused up front."""
        problems = []
        needs = (("max_base_pass_rate", "prompts_file", ("base",)), ("min_tuned_pass_rate", "prompts_file", TUNED),
                 ("min_general_kept", "general_file", ("base",)), ("min_general_kept", "general_file", TUNED),
                 ("max_text_perplexity_delta", "perplexity_file", ("merged",)))
        for key, file_key, artifacts in needs:
            if getattr(self, key) is None:
                continue
            if not getattr(self, file_key) and f"eval.{key}: needs eval.{file_key}" not in problems:
                problems.append(f"eval.{key}: needs eval.{file_key}")
            if not set(artifacts) & set(self.artifacts):
                problems.append(f"eval.{key}: needs {' or '.join(artifacts)} in eval.artifacts")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class ReportConfig(Section):
    """`report`: the one-page HTML report."""

    title: str | None = Field(None, description="Report title; default: the run name.")
    generations_shown: int = Field(
        20, ge=0, description="Generations per artifact shown in the report (from generations.jsonl)."
    )
    side_by_side: int = Field(
        5, ge=0,
        description="Prompt checks (the first ones of eval.prompts_file) shown side by side: the expectation, "
        "each evaluated artifact's answer and the served model's (smoke-test), each marked pass/fail. 0: none.",
    )
