"""Prompt checks: read the checks file (YAML or JSON) and judge one output.

`eval-sft` judges each artifact's greedy output in process, `smoke-test` the served model's
answer over the OpenAI API; both parse `eval.prompts_file` with `load_checks` and judge with
`judge`, so a check means the same thing in both.

A checks file holds `checks:`, a list of `{name, system?, prompt, expect}` where `expect` has any
of `exact` (whole output, stripped), `contains` (substring, or a list of substrings), `regex`
(`re.search`), `max_length` (characters) and `must_stop` (generation ended with an end-of-turn
token before the token limit: `eval.max_new_tokens`, or finish_reason "stop" within
`smoke_test.max_tokens`). Every expectation listed must hold for the check to pass.
`data/demo/eval_prompts.json` is an example.

    ftpipe eval-sft --config debug_config.yaml --set eval.prompts_file=data/demo/eval_prompts.json

`judge` imports only the standard library: it also runs in the awq environment's worker.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

EXPECT_KEYS = ("exact", "contains", "regex", "max_length", "must_stop")


def read_named_file(path: Path, key: str, shown: str) -> tuple[str, str]:
    """The UTF-8 text of the file config key `key` names (shown as `shown`), and the hint its
    messages carry.

    Raises:
        InputError: one line naming the key and the file: not found, not UTF-8, unreadable.
    """
    from ftpipe.core.errors import InputError

    hint = f"fix the file, or set {key} (docs/eval-report.md shows the format)"
    try:
        return Path(path).read_text(encoding="utf-8"), hint
    except FileNotFoundError:
        raise InputError(f"{key} {shown}: file not found", hint=hint) from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{key} {shown}: not UTF-8 text (byte {exc.start})", hint=hint) from None
    except OSError as exc:
        raise InputError(f"{key} {shown}: cannot read ({type(exc).__name__})", hint=hint) from None


def load_checks(path: Path, shown: str | None = None, key: str = "eval.prompts_file") -> list[dict[str, Any]]:
    """Read and validate a checks file; every problem is reported at once.

    Args:
        path: the YAML (.yaml/.yml) or JSON file.
        shown: how to name the file in messages (default: `path`).
        key: the config key that names the file, in messages (eval-sft's `eval.general_file` is a
            checks file too).

    Returns:
        The checks as plain dicts: name, system (or None), prompt, expect.

    Raises:
        InputError: missing or unreadable file, invalid YAML/JSON, or invalid checks (all listed).
    """
    from ftpipe.core.errors import InputError

    shown = shown or str(path)
    text, hint = read_named_file(path, key, shown)
    data = _parse(text, Path(path).suffix.lower(), shown, hint)
    if isinstance(data, dict):
        data = data.get("checks")
    if not isinstance(data, list) or not data:
        raise InputError(f"{shown}: expected a non-empty list under `checks:`", hint=hint)
    problems: list[str] = []
    checks: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, item in enumerate(data):
        where = f"{shown}: checks[{i}]"
        if not isinstance(item, dict):
            problems.append(f"{where}: expected a mapping, got {type(item).__name__}")
            continue
        unknown = sorted(set(item) - {"name", "system", "prompt", "expect"})
        if unknown:
            problems.append(f"{where}: unknown key(s) {', '.join(unknown)}")
        name = item.get("name", f"check-{i}")
        if not isinstance(name, str) or not name:
            problems.append(f"{where}.name: expected a non-empty string")
            name = f"check-{i}"
        elif name in seen:
            problems.append(f"{where}.name: duplicate name {name!r}")
        seen.add(name)
        prompt, system = item.get("prompt"), item.get("system")
        if not isinstance(prompt, str) or not prompt:
            problems.append(f"{where}.prompt: expected a non-empty string")
        if system is not None and not isinstance(system, str):
            problems.append(f"{where}.system: expected a string")
        expect = item.get("expect")
        if not isinstance(expect, dict) or not expect:
            problems.append(f"{where}.expect: expected a mapping with any of {', '.join(EXPECT_KEYS)}")
            expect = {}
        problems.extend(_expect_problems(expect, f"{where}.expect"))
        checks.append({"name": name, "system": system, "prompt": prompt, "expect": expect})
    if problems:
        raise InputError("; ".join(problems), hint=hint)
    return checks


def _parse(text: str, suffix: str, shown: str, hint: str) -> Any:
    from ftpipe.core.errors import InputError

    if suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{shown}:{exc.lineno}: invalid JSON: {exc.msg}", hint=hint) from None
    import yaml  # YAML is a superset of JSON: other suffixes go through it

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{shown}:{mark.line + 1}" if mark is not None else shown
        raise InputError(f"{where}: invalid YAML: {getattr(exc, 'problem', None) or exc}", hint=hint) from None


def _expect_problems(expect: dict[str, Any], where: str) -> list[str]:
    problems = []
    for key, value in expect.items():
        if key not in EXPECT_KEYS:
            problems.append(f"{where}.{key}: unknown expectation (use {', '.join(EXPECT_KEYS)})")
        elif key == "exact" and not isinstance(value, str):
            problems.append(f"{where}.exact: expected a string, got {type(value).__name__} (quote it in YAML)")
        elif key == "contains" and not (
            isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, str) for v in value))
        ):
            problems.append(f"{where}.contains: expected a string or a list of strings (quote them in YAML)")
        elif key == "regex":
            if not isinstance(value, str):
                problems.append(f"{where}.regex: expected a string")
            else:
                try:
                    re.compile(value)
                except re.error as exc:
                    problems.append(f"{where}.regex: invalid regular expression ({exc})")
        elif key == "max_length" and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            problems.append(f"{where}.max_length: expected a non-negative integer (characters)")
        elif key == "must_stop" and not isinstance(value, bool):
            problems.append(f"{where}.must_stop: expected true or false")
    return problems


def judge(output: str, stopped: bool, expect: dict[str, Any]) -> list[str]:
    """The expectations `output` fails (empty list = pass).

    Args:
        output: the generated text (special tokens removed).
        stopped: whether generation ended with an end-of-turn token before the token limit.
        expect: the check's `expect` mapping.
    """
    failures = []
    text = output.strip()
    if "exact" in expect and text != expect["exact"].strip():
        failures.append(f"exact: expected {expect['exact']!r}")
    if "contains" in expect:
        wanted = [expect["contains"]] if isinstance(expect["contains"], str) else expect["contains"]
        missing = [w for w in wanted if w not in output]
        if missing:
            failures.append(f"contains: missing {', '.join(repr(m) for m in missing)}")
    if "regex" in expect and re.search(expect["regex"], output) is None:
        failures.append(f"regex: no match for {expect['regex']!r}")
    if "max_length" in expect and len(text) > expect["max_length"]:
        failures.append(f"max_length: {len(text)} > {expect['max_length']} characters")
    if expect.get("must_stop") and not stopped:
        failures.append("must_stop: no end-of-turn token before max_new_tokens")
    return failures
