"""eval-sft's general-ability checks (`eval.general_file`, `general_kept`), held-out text perplexity
(`eval.perplexity_file`) and the thresholds a run must pass (`eval.max_base_pass_rate`,
`eval.min_tuned_pass_rate`, `eval.min_general_kept`).

The slow tests evaluate a copy of the tuned run (`tuned_project`, 200 TRL steps) once with a general
checks file and a held-out text file (`evaluated_general`), then once more with a bound it misses.
The fast tests cover the pure parts: `general_kept`, the text windows, the thresholds.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/eval/test_general_text.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tests.project_factory as factory
from tests.dpo_fixture import copy_project
from tests.eval.conftest import RUN, cli

# Unrelated to the sentiment task. The random base answers 8 random tokens: it passes
# "short-answer" and "not-a-label" and never stops. The tuned model answers a label to anything.
GENERAL_YAML = """\
checks:
  - name: short-answer
    prompt: "What is the capital of France?"
    expect: {max_length: 200}
  - name: not-a-label
    prompt: "Name a colour."
    expect: {regex: "^(?!(positive|negative)$)"}
  - name: stops
    prompt: "Say hello."
    expect: {must_stop: true}
"""


def _metrics(root: Path) -> dict:
    return json.loads((root / "outputs" / RUN / "eval" / "metrics.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def evaluated_general(tuned_project, tmp_path_factory):
    """eval-sft of base, adapter and merged on a copy of the tuned run, with general checks:
    (project root, CLI result)."""
    root = copy_project(tuned_project, tmp_path_factory.mktemp("evaluated-general") / "proj")
    (root / "general_checks.yaml").write_text(GENERAL_YAML, encoding="utf-8")
    factory.update_config(root, {"eval": {"general_file": "general_checks.yaml",
                                          "artifacts": ["base", "adapter", "merged"]}})
    return root, cli("eval-sft", root, "--run", RUN)


@pytest.mark.slow
def test_general_checks_and_kept(evaluated_general):
    root, result = evaluated_general
    assert result.code == 0, result.output
    doc = _metrics(root)
    assert doc["general_file"] == "general_checks.yaml"
    arts = doc["artifacts"]
    passed = {n: {c["name"]: c["passed"] for c in arts[n]["general"]} for n in ("base", "adapter", "merged")}
    assert passed["base"] == {"short-answer": True, "not-a-label": True, "stops": False}
    assert passed["adapter"] == passed["merged"] == {"short-answer": True, "not-a-label": False, "stops": True}
    # The base passed two; the tuned models keep one of them ("stops" is not the base's to keep).
    assert (arts["base"]["general_passed"], arts["base"]["general_total"]) == (2, 3)
    assert "general_kept" not in arts["base"]
    assert arts["adapter"]["general_kept"] == arts["merged"]["general_kept"] == 0.5
    assert "general_kept" not in arts["awq"]  # skipped: nothing measured
    rows = [json.loads(line) for line in (root / "outputs" / RUN / "eval" / "generations.jsonl").read_text().splitlines()]
    general = {(r["artifact"], r["name"]): r for r in rows if r["kind"] == "general"}
    assert len(general) == 3 * 3
    assert general[("adapter", "not-a-label")]["output"] == "positive"
    manifest = json.loads((root / "logs" / RUN / "eval-sft" / "manifest.json").read_text())
    assert manifest["metrics"]["artifacts"]["adapter"]["general_kept"] == 0.5
    assert "general" in manifest["inputs"]


def _artifact(general: dict[str, bool] | None, status: str = "ok") -> dict:
    a = {"status": status}
    if general is not None:
        a["general"] = [{"name": n, "passed": p, "failures": []} for n, p in general.items()]
    return a


def test_general_kept_is_the_share_of_the_bases_passes_kept():
    from ftpipe.eval.eval_sft import add_general_kept

    arts = {"base": _artifact({"a": True, "b": True, "c": False, "d": True}),
            "adapter": _artifact({"a": True, "b": False, "c": True, "d": True}),
            "merged": _artifact({"a": False, "b": False, "c": True, "d": False}),
            "awq": {"status": "skipped", "reason": "not produced"}}
    add_general_kept(arts)
    assert "general_kept" not in arts["base"] and "general_kept" not in arts["awq"]
    assert arts["adapter"]["general_kept"] == pytest.approx(2 / 3)
    assert arts["merged"]["general_kept"] == 0.0
    # No base result (skipped, failed) or a base that passed nothing: nothing to keep, None.
    for base in (_artifact(None, "skipped"), _artifact({"a": True}, "failed"), _artifact({"a": False, "b": False})):
        arts = {"base": base, "adapter": _artifact({"a": True, "b": True})}
        add_general_kept(arts)
        assert arts["adapter"]["general_kept"] is None


def test_a_bad_general_file_is_a_preflight_problem_named_by_its_key(tmp_path, tiny_model_dir):
    from tests.eval.test_evaluate import _bare_run

    root = _bare_run(tmp_path, tiny_model_dir, finetuned=True)
    result = cli("eval-sft", root, "--run", RUN, "--set", "eval.general_file=missing.yaml")
    assert result.code == 2
    assert "eval.general_file missing.yaml: file not found" in result.stderr
