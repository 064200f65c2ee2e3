"""eval-sft's answers: the checks, general checks and samples asked in one batched call
(`eval.generate_batch_size`), judged and recorded in the order they were before batching."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftpipe.config import load_config
from ftpipe.core.errors import ConfigError
from ftpipe.eval.measure import measure_answers, one_at_a_time
from ftpipe.eval.spec import ArtifactSpec, EvalSpec

SYSTEM = "Label the sentiment of the review as positive or negative."
CHECKS = [
    {"name": "c-pos", "system": SYSTEM, "prompt": "Lovely scarf.", "expect": {"exact": "positive", "must_stop": True}},
    {"name": "c-neg", "system": None, "prompt": "An awful and flimsy kettle, sadly.", "expect": {"max_length": 5}},
]
GENERAL = [{"name": "g-hello", "system": None, "prompt": "Say hello.", "expect": {"must_stop": True}}]
ROWS = [
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Great sofa."},
     {"role": "assistant", "content": "positive"}],
    [{"role": "user", "content": "No answer here."}],  # no reference: not a sample
    [{"role": "user", "content": "Bad lamp."}, {"role": "assistant", "content": "negative"},
     {"role": "user", "content": "And the chair?"}, {"role": "assistant", "content": "positive"}],
]


def _spec(tmp_path: Path, generate_batch_size: int = 8) -> EvalSpec:
    return EvalSpec(
        artifacts=[ArtifactSpec(name="base", model="models/tiny", tokenizer="models/tiny")], environment="train",
        val_file=tmp_path / "val.jsonl", max_val_rows=None, max_length=512, batch_tokens=1024, checks=CHECKS,
        general=GENERAL, max_new_tokens=6, samples=3, generate_batch_size=generate_batch_size, dtype="float32",
    )


def test_every_prompt_is_asked_in_one_call_and_recorded_in_the_old_order(tmp_path):
    calls = []

    def answer_all(conversations):
        calls.append(conversations)
        return [("positive", True, 2), ("negative here", False, 6), ("hi", True, 2), ("positive", True, 2),
                ("neg", False, 6)]

    generations = []
    result = measure_answers(answer_all, ROWS, _spec(tmp_path), "base", generations)
    assert calls == [[
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Lovely scarf."}],
        [{"role": "user", "content": "An awful and flimsy kettle, sadly."}],
        [{"role": "user", "content": "Say hello."}],
        ROWS[0][:2],
        ROWS[2][:3],
    ]]
    assert [(g["kind"], g["name"], g["output"], g["stopped"], g["new_tokens"]) for g in generations] == [
        ("check", "c-pos", "positive", True, 2), ("check", "c-neg", "negative here", False, 6),
        ("general", "g-hello", "hi", True, 2), ("sample", "val-0", "positive", True, 2),
        ("sample", "val-2", "neg", False, 6),
    ]
    assert generations[1] == {
        "artifact": "base", "kind": "check", "name": "c-neg", "prompt": "An awful and flimsy kettle, sadly.",
        "output": "negative here", "stopped": False, "new_tokens": 6, "passed": False,
        "failures": generations[1]["failures"], "expect": {"max_length": 5},
    }
    assert generations[1]["failures"]
    assert generations[4] == {"artifact": "base", "kind": "sample", "name": "val-2", "prompt": "And the chair?",
                              "reference": "positive", "output": "neg", "stopped": False, "new_tokens": 6}
    assert (result["checks_passed"], result["checks_total"], result["general_passed"], result["general_total"]) == (
        1, 2, 1, 1)
    assert [c["name"] for c in result["checks"]] == ["c-pos", "c-neg"]


def test_one_at_a_time_answers_each_conversation_in_order():
    asked = []

    def answer(messages):
        asked.append(messages)
        return messages[-1]["content"].upper(), False, len(asked)

    conversations = [[{"role": "user", "content": c}] for c in ("a", "b", "c")]
    assert one_at_a_time(answer)(conversations) == [("A", False, 1), ("B", False, 2), ("C", False, 3)]
    assert asked == conversations


def test_batched_answers_make_the_rows_one_at_a_time_answers_make(tmp_path, tiny_model_dir):
    """The transformers path (generate_batch, 2 prompts a batch) and the one-at-a-time path (how
    the GGUF artifacts are answered, here with `generate`) record the same generations."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftpipe.handoff.measure import generate, generate_batch

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    spec = _spec(tmp_path, generate_batch_size=2)
    batched, alone = [], []
    measure_answers(lambda c: generate_batch(model, tok, c, spec.max_new_tokens, spec.generate_batch_size),
                    ROWS, spec, "base", batched)
    measure_answers(one_at_a_time(lambda m: generate(model, tok, m, spec.max_new_tokens)), ROWS, spec, "base", alone)
    assert len(batched) == 5 and batched == alone


def _config(tmp_path: Path, value: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(f"model:\n  path: m\neval:\n  max_new_tokens: 16\n  generate_batch_size: {value}\n", encoding="utf-8")
    return path


def test_generate_batch_size_defaults_to_8_and_1_is_one_at_a_time(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("model:\n  path: m\n", encoding="utf-8")
    assert load_config(path, environ={}).config.eval.generate_batch_size == 8
    assert load_config(_config(tmp_path, "1"), environ={}).config.eval.generate_batch_size == 1


@pytest.mark.parametrize("value, problem", [
    ("0", "Input should be greater than 0 (got 0)"),
    ("-2", "Input should be greater than 0 (got -2)"),
    ("many", "Input should be a valid integer, unable to parse string as an integer (got 'many')"),
    ("2.5", "Input should be a valid integer, got a number with a fractional part (got 2.5)"),
])
def test_a_bad_generate_batch_size_is_refused_naming_the_key(tmp_path, value, problem):
    path = _config(tmp_path, value)
    with pytest.raises(ConfigError) as exc:
        load_config(path, environ={})
    assert exc.value.message == f"{path}:5: eval.generate_batch_size: {problem}"
    with pytest.raises(ConfigError) as exc:  # the same from --set
        load_config(_config(tmp_path, "4"), [f"eval.generate_batch_size={value}"], environ={})
    assert exc.value.message == f"--set eval.generate_batch_size: eval.generate_batch_size: {problem}"
