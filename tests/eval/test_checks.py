"""Prompt checks: the file formats (YAML, JSON), validation messages, and how outputs are judged."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftpipe.core.errors import InputError
from ftpipe.handoff.checks import judge, load_checks

REPO = Path(__file__).resolve().parents[2]


def test_demo_prompts_json_loads():
    checks = load_checks(REPO / "data/demo/eval_prompts.json")
    assert len(checks) == 20
    assert checks[0] == {
        "name": "held-out-00",
        "system": "Label the sentiment of the review as positive or negative.",
        "prompt": "Review of the scarf: lovely, sturdy.",
        "expect": {"exact": "positive"},
    }


def test_yaml_with_every_expectation(tmp_path):
    f = tmp_path / "checks.yaml"
    f.write_text(
        "checks:\n"
        "  - name: all\n    prompt: hi\n"
        "    expect: {exact: 'yes', contains: [a, b], regex: '^y', max_length: 3, must_stop: true}\n"
        "  - name: no-system\n    prompt: hello\n    expect:\n      contains: x\n",
        encoding="utf-8",
    )
    checks = load_checks(f)
    assert [c["name"] for c in checks] == ["all", "no-system"]
    assert checks[0]["expect"]["contains"] == ["a", "b"]
    assert checks[1]["system"] is None


def test_a_bare_list_is_accepted(tmp_path):
    f = tmp_path / "checks.yml"
    f.write_text("- {name: one, prompt: p, expect: {regex: .}}\n", encoding="utf-8")
    assert load_checks(f)[0]["name"] == "one"


def test_every_problem_is_reported_at_once(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(
        "checks:\n"
        "  - name: a\n    prompt: ''\n    expect: {exact: 3}\n"
        "  - name: a\n    prompt: p\n    expect: {regex: '(', max_length: -1, must_stop: 'yes', sounds_like: x}\n"
        "  - name: c\n    prompt: p\n    colour: red\n",
        encoding="utf-8",
    )
    with pytest.raises(InputError) as err:
        load_checks(f, "bad.yaml")
    assert err.value.message == (
        "bad.yaml: checks[0].prompt: expected a non-empty string; "
        "bad.yaml: checks[0].expect.exact: expected a string, got int (quote it in YAML); "
        "bad.yaml: checks[1].name: duplicate name 'a'; "
        "bad.yaml: checks[1].expect.regex: invalid regular expression (missing ), unterminated subpattern at position 0); "
        "bad.yaml: checks[1].expect.max_length: expected a non-negative integer (characters); "
        "bad.yaml: checks[1].expect.must_stop: expected true or false; "
        "bad.yaml: checks[1].expect.sounds_like: unknown expectation (use exact, contains, regex, max_length, must_stop); "
        "bad.yaml: checks[2]: unknown key(s) colour; "
        "bad.yaml: checks[2].expect: expected a mapping with any of exact, contains, regex, max_length, must_stop"
    )


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("c.json", '{"checks": [', "c.json:1: invalid JSON: Expecting value"),
        ("c.yaml", "checks: [a, b\n", "c.yaml:2: invalid YAML: expected ',' or ']', but got '<stream end>'"),
        ("c.yaml", "checks: []\n", "c.yaml: expected a non-empty list under `checks:`"),
        ("c.yaml", "", "c.yaml: expected a non-empty list under `checks:`"),
    ],
)
def test_unreadable_files(tmp_path, name, text, message):
    f = tmp_path / name
    f.write_text(text, encoding="utf-8")
    with pytest.raises(InputError) as err:
        load_checks(f, name)
    assert err.value.message == message


def test_missing_file(tmp_path):
    with pytest.raises(InputError) as err:
        load_checks(tmp_path / "nope.yaml", "nope.yaml")
    assert err.value.one_line() == (
        "eval.prompts_file nope.yaml: file not found "
        "(next: fix the file, or set eval.prompts_file (docs/eval-report.md shows the format))"
    )


def test_judge():
    assert judge(" positive\n", True, {"exact": "positive", "must_stop": True}) == []
    assert judge("positive!", False, {"exact": "positive", "must_stop": True}) == [
        "exact: expected 'positive'",
        "must_stop: no end-of-turn token before max_new_tokens",
    ]
    assert judge("a b", True, {"contains": ["a", "c", "d"]}) == ["contains: missing 'c', 'd'"]
    assert judge("abc", True, {"contains": "b", "regex": r"^a\w+$", "max_length": 3}) == []
    assert judge("abcd", True, {"regex": "z", "max_length": 3}) == [
        "regex: no match for 'z'",
        "max_length: 4 > 3 characters",
    ]
    assert judge("", False, {"must_stop": False}) == []
