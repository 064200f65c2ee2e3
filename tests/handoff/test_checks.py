"""One checks file, every documented key: parsed by the one `load_checks` for eval-sft and
smoke-test, and judged the same way from eval's (output, stopped) and smoke's (answer, finish_reason)."""

from __future__ import annotations

import pytest

import ftpipe.eval.eval_sft as eval_sft
import ftpipe.handoff.checks as handoff_checks
import ftpipe.serve.smoke_test as smoke
from ftpipe.handoff.checks import judge, load_checks

EVERY_KEY = """\
checks:
  - name: label
    system: Label the sentiment of the review as positive or negative.
    prompt: A lovely scarf.
    expect:
      exact: positive
      must_stop: true
  - name: substring
    prompt: Say hello.
    expect: {contains: hello}
  - name: substrings
    prompt: Say hello world.
    expect:
      contains: [hello, world]
      max_length: 12
  - name: pattern
    prompt: A number?
    expect: {regex: '^\\d+$', must_stop: false}
"""

# (check, answer, finish_reason) -> failed expectations, as eval-sft reports them.
CASES = [
    ("label", " positive\n", "stop", []),
    ("label", "positive", "length", ["must_stop: no end-of-turn token before max_new_tokens"]),
    ("label", "negative", "stop", ["exact: expected 'positive'"]),
    ("substring", "well hello there", "stop", []),
    ("substring", "hi", "stop", ["contains: missing 'hello'"]),
    ("substrings", "hello world", "length", []),
    ("substrings", "hello, dear world", "stop", ["max_length: 17 > 12 characters"]),
    ("substrings", "hello", "stop", ["contains: missing 'world'"]),
    ("pattern", "42", "length", []),
    ("pattern", "forty-two", "stop", ["regex: no match for '^\\\\d+$'"]),
]


@pytest.fixture
def checks(tmp_path):
    path = tmp_path / "eval_checks.yaml"
    path.write_text(EVERY_KEY, encoding="utf-8")
    return {c["name"]: c for c in load_checks(path, "eval_checks.yaml")}


def test_eval_and_smoke_test_parse_with_the_same_function():
    assert eval_sft.load_checks is smoke.load_checks is handoff_checks.load_checks
    assert smoke.judge is handoff_checks.judge
    assert not hasattr(smoke, "load_prompt_checks") and not hasattr(smoke, "check_answer")


def test_every_documented_key_is_accepted(checks):
    assert checks["label"]["system"].startswith("Label the sentiment")
    assert checks["label"]["expect"] == {"exact": "positive", "must_stop": True}
    assert checks["substring"]["system"] is None and checks["substring"]["expect"] == {"contains": "hello"}
    assert checks["substrings"]["expect"] == {"contains": ["hello", "world"], "max_length": 12}
    assert checks["pattern"]["expect"] == {"regex": r"^\d+$", "must_stop": False}


@pytest.mark.parametrize(("name", "answer", "finish_reason", "failures"), CASES)
def test_smoke_verdict_is_evals_judgement(checks, name, answer, finish_reason, failures):
    check = checks[name]
    # eval-sft: generation stopped on an end-of-turn token <=> the server's finish_reason "stop".
    assert judge(answer, finish_reason == "stop", check["expect"]) == failures
    assert smoke.check_verdict(check, answer, finish_reason) == {
        "name": name, "prompt": check["prompt"], "answer": answer, "finish_reason": finish_reason,
        "passed": not failures, "problems": failures,
    }


def test_smoke_verdict_calls_the_shared_judge(checks, monkeypatch):
    seen = []

    def spy(output, stopped, expect):
        seen.append((output, stopped, expect))
        return ["from the shared judge"]

    monkeypatch.setattr(smoke, "judge", spy)
    verdict = smoke.check_verdict(checks["label"], "positive", "length")
    assert seen == [("positive", False, checks["label"]["expect"])]
    assert verdict["passed"] is False and verdict["problems"] == ["from the shared judge"]
