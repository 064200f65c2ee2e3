"""eval-sft's preference accuracy (base vs SFT adapter vs DPO adapter on held-out pairs) and the
report's "SFT vs DPO" part.

The slow test evaluates a run with a real SFT adapter (200 TRL steps) and a real DPO adapter (20
DPOTrainer steps from it, `sft_dpo_project` in tests/dpo_fixture.py, shared with tests/serve) on 40
held-out pairs: chosen = the right sentiment label, rejected = the other. The fast tests cover why
the column is "-" and the rendering.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/eval/test_preference.py
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.dpo_fixture import copy_project
from tests.eval.conftest import PREF, RUN, cli


@pytest.mark.slow
def test_preference_accuracy_of_base_sft_and_dpo(sft_dpo_project, tmp_path):
    root = copy_project(sft_dpo_project, tmp_path / "proj")  # the session's project is shared with tests/serve
    result = cli("eval-sft", root, "--run", RUN, "--set", "eval.artifacts=[base, adapter, dpo_adapter]",
                 "--set", "eval.max_pairs=40")
    assert result.code == 0, result.output
    doc = json.loads((root / "outputs" / RUN / "eval" / "metrics.json").read_text())
    assert doc["preference"] == {"val_file": f"prepared/{PREF}/val.jsonl", "pairs": 40}
    arts = doc["artifacts"]
    base, sft, dpo = arts["base"], arts["adapter"], arts["dpo_adapter"]
    assert base["status"] == sft["status"] == dpo["status"] == "ok"
    assert dpo["adapter"] == "outputs/r1/dpo_adapter" and sft["adapter"] == "outputs/r1/adapter"
    assert base["preference_pairs"] == sft["preference_pairs"] == dpo["preference_pairs"] == 40
    # The random base has no idea which label is right; SFT learnt the labels; DPO keeps them and
    # widens the gap between the right and the wrong label (what its loss pushes).
    assert base["preference_accuracy"] < 0.8
    assert sft["preference_accuracy"] >= 0.95 and dpo["preference_accuracy"] >= 0.95
    assert dpo["preference_margin"] > sft["preference_margin"] > base["preference_margin"]
    # The same metrics as the SFT adapter: perplexity over the val split, the prompt checks.
    assert dpo["assistant_tokens"] == sft["assistant_tokens"] == 160
    assert dpo["checks_total"] == 3 and dpo["checks_passed"] >= 2
    assert arts["merged"] == {"status": "skipped", "reason": "not in eval.artifacts"}
    manifest = json.loads((root / "logs" / RUN / "eval-sft" / "manifest.json").read_text())
    assert manifest["metrics"]["preference_accuracy_dpo_adapter"] == dpo["preference_accuracy"]
    assert manifest["inputs"]["pairs"]["path"] == f"prepared/{PREF}/val.jsonl"
    assert manifest["inputs"]["dpo_adapter"]["path"] == "logs/r1/finetune-dpo/manifest.json"
    assert "pref. acc" in result.stdout and "40 held-out pairs" in result.stdout

    report = cli("report", root, "--run", RUN)
    assert report.code == 0, report.output
    html = (root / "outputs" / RUN / "report.html").read_text(encoding="utf-8")
    assert "SFT vs DPO" in html
    assert f'id="pref-acc-dpo_adapter">{dpo["preference_accuracy"]:.0%}<' in html


def _ctx(tmp_path: Path, source: str | None, name: str = PREF):
    from ftpipe.core.runs import Project
    from ftpipe.eval.config import EvalConfig

    project = Project(tmp_path, tmp_path / "prepared", tmp_path / "outputs", tmp_path / "logs")
    config = SimpleNamespace(eval=EvalConfig(), preference=SimpleNamespace(name=name, source=source))
    return SimpleNamespace(project=project, config=config)


PAIR = {"prompt": [{"role": "user", "content": "A lovely scarf."}], "chosen": [{"role": "assistant", "content": "positive"}],
        "rejected": [{"role": "assistant", "content": "negative"}]}


def test_without_pairs_the_column_says_why(tmp_path):
    from ftpipe.eval.eval_sft import preference_pairs

    problems: list[str] = []
    assert preference_pairs(_ctx(tmp_path, None), problems) == (
        None, {"status": "skipped", "reason": "no preference set (preference.source is not set)"})
    assert preference_pairs(_ctx(tmp_path, "data/pairs.jsonl"), problems) == (
        None, {"status": "skipped", "reason": f"no held-out pairs prepared/{PREF}/val.jsonl (ftpipe preprocess-dpo)"})
    val = tmp_path / "prepared" / PREF / "val.jsonl"
    val.parent.mkdir(parents=True)
    val.write_text("")
    assert preference_pairs(_ctx(tmp_path, "data/pairs.jsonl"), problems)[1]["reason"] == (
        f"prepared/{PREF}/val.jsonl has no pairs (preference.val_fraction is 0?)")
    assert problems == []  # missing pairs are no failure
    val.write_text(json.dumps(PAIR) + "\n" + json.dumps({**PAIR, "chosen": []}) + "\n")
    assert preference_pairs(_ctx(tmp_path, "data/pairs.jsonl"), problems) == (None, {})
    assert problems == [f"{val}:2: chosen: expected a non-empty list of messages"]  # a broken file is one
    val.write_text(json.dumps(PAIR) + "\n")
    assert preference_pairs(_ctx(tmp_path, "data/pairs.jsonl"), []) == (val, {"val_file": f"prepared/{PREF}/val.jsonl", "pairs": 1})


def _render(eval_doc, smoke=None) -> str:
    from ftpipe.core.runs import Project, RunDir
    from ftpipe.eval.report import render

    project = Project(Path("/nonexistent"), Path("/nonexistent/p"), Path("/nonexistent/o"), Path("/nonexistent/l"))
    return render(title="t", run=RunDir(project, "r1"), dataset="d", manifests={}, metadata=None, scalars={},
                  eval_doc=eval_doc, generations=[], smoke=smoke)


def test_report_shows_sft_vs_dpo_side_by_side():
    ok = {"status": "ok", "checks_passed": 2, "checks_total": 3}
    doc = {"preference": {"val_file": f"prepared/{PREF}/val.jsonl", "pairs": 40}, "artifacts": {
        "base": {**ok, "checks_passed": 0, "preference_accuracy": 0.45, "preference_margin": -0.12, "preference_pairs": 40},
        "adapter": {**ok, "preference_accuracy": 0.975, "preference_margin": 6.5, "preference_pairs": 40},
        "dpo_adapter": {**ok, "checks_passed": 3, "preference_accuracy": 1.0, "preference_margin": 9.25, "preference_pairs": 40},
        "merged": {"status": "skipped", "reason": "not produced"}}}
    checks = [{"name": "a", "passed": True}, {"name": "b", "passed": False}]
    smoke = {"models": {"r1-base": {"prompt_checks": [{"passed": False}] * 2}, "r1-sft": {"prompt_checks": checks},
                        "r1-dpo": {"prompt_checks": [{"passed": True}] * 2}}}
    html = _render(doc, smoke)
    part = html[html.index('id="sft-vs-dpo"'):]
    part = part[: part.index("</table>")]
    assert 'id="pref-acc-base">45%<' in part and 'id="pref-acc-adapter">98%<' in part
    assert 'id="pref-acc-dpo_adapter">100%<' in part
    for cell in ("9.25", "-0.12", "0/3 (0%)", "2/3 (67%)", "3/3 (100%)", "1/2 (50%)", "2/2 (100%)", "0/2 (0%)", "r1-dpo"):
        assert cell in part, cell
    assert "40 held-out pairs" in html

    # Pairs missing: the DPO adapter's checks still shown, preference accuracy "-" with the reason.
    doc["preference"] = {"status": "skipped", "reason": "no preference set (preference.source is not set)"}
    for a in doc["artifacts"].values():
        for key in ("preference_accuracy", "preference_margin", "preference_pairs"):
            a.pop(key, None)
    html = _render(doc)
    assert 'id="pref-acc-dpo_adapter">-<' in html
    assert "preference accuracy: - (no preference set (preference.source is not set))" in html
    # Neither a DPO adapter nor pairs: no such part.
    doc["artifacts"]["dpo_adapter"] = {"status": "skipped", "reason": "not produced (ftpipe finetune-dpo --run r1)"}
    assert "sft-vs-dpo" not in _render(doc)
