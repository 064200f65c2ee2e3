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

from tests.dpo_fixture import copy_project
from tests.eval.conftest import HELDOUT_TXT, RUN, cli


def _metrics(root: Path) -> dict:
    return json.loads((root / "outputs" / RUN / "eval" / "metrics.json").read_text(encoding="utf-8"))


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


@pytest.mark.slow
def test_text_perplexity_per_artifact(evaluated_general):
    from transformers import AutoTokenizer

    from ftpipe.eval.text import read_documents, text_windows

    root, result = evaluated_general
    assert result.code == 0, result.output
    doc = _metrics(root)
    assert doc["perplexity_file"] == "heldout.txt"
    arts = doc["artifacts"]
    documents = read_documents(root / "heldout.txt")
    windows = text_windows(AutoTokenizer.from_pretrained(root / "models" / "tiny"), documents, 2048)
    for name in ("base", "adapter", "merged"):
        a = arts[name]
        assert a["text_windows"] == 3 and a["text_tokens"] == sum(len(w) - 1 for w in windows)
        assert a["text_perplexity"] > 1
        assert a["perplexity"] != a["text_perplexity"]  # the val split's stays as it was, next to it
    assert arts["merged"]["text_perplexity"] == pytest.approx(arts["adapter"]["text_perplexity"], rel=1e-3)
    assert "text_perplexity_delta_vs_merged" not in arts["merged"]  # only the quantized artifacts have one
    manifest = json.loads((root / "logs" / RUN / "eval-sft" / "manifest.json").read_text())
    assert manifest["metrics"]["artifacts"]["merged"]["text_perplexity"] == arts["merged"]["text_perplexity"]
    assert "perplexity_text" in manifest["inputs"]


def test_documents_are_blank_line_separated(tmp_path):
    from ftpipe.eval.text import read_documents

    f = tmp_path / "t.txt"
    f.write_text(HELDOUT_TXT.replace("\n", "\r\n"), encoding="utf-8")
    assert read_documents(f) == [
        "The river rose slowly through the night, and by morning the low fields were under water.",
        "Farmers moved their animals to the hills.\n  Some of them stayed there for a week.",
        "Once the water went down, the soil was darker and richer than before.",
    ]


@pytest.mark.parametrize("content, message", [
    (None, "eval.perplexity_file t.txt: file not found"),
    (b"\n \n\n", "eval.perplexity_file t.txt: no text in it"),
    (b"caf\xe9\n", "eval.perplexity_file t.txt: not UTF-8 text (byte 3)"),
])
def test_a_bad_text_file_is_one_line(tmp_path, content, message):
    from ftpipe.core.errors import InputError
    from ftpipe.eval.text import read_documents

    if content is not None:
        (tmp_path / "t.txt").write_bytes(content)
    with pytest.raises(InputError) as err:
        read_documents(tmp_path / "t.txt", "t.txt")
    assert err.value.message == message


def test_text_perplexity_windows_match_the_models_own_loss(tiny_model_dir):
    """Windows of max_length tokens, first token of each window context only, batched and padded:
    the same NLL as the model's own loss on each window alone."""
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftpipe.eval.measure import text_perplexity
    from ftpipe.eval.text import read_documents, text_windows

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    docs = ["one two three four five six seven eight nine ten eleven twelve", "a b", "x"]
    ids = [list(tok(d, add_special_tokens=True)["input_ids"]) for d in docs]
    windows = text_windows(tok, docs, 5)
    assert windows == [w for doc in ids for w in (doc[i:i + 5] for i in range(0, len(doc), 5)) if len(w) > 1]
    assert all(len(w) <= 5 for w in windows) and len(windows) >= 3
    got = text_perplexity(model, windows, batch_tokens=12)  # several batches, padded
    nll = tokens = 0
    with torch.inference_mode():
        for w in windows:
            x = torch.tensor([w])
            nll += float(model(input_ids=x, labels=x).loss) * (len(w) - 1)
            tokens += len(w) - 1
    assert got["text_tokens"] == tokens and got["text_windows"] == len(windows)
    assert got["text_perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-4)


def test_the_quantized_artifacts_delta_is_relative_to_merged():
    from ftpipe.eval.eval_sft import add_text_deltas

    arts = {"adapter": {"text_perplexity": 9.0}, "merged": {"text_perplexity": 10.0}, "awq": {"text_perplexity": 11.0}}
    add_text_deltas(arts)
    assert arts["awq"]["text_perplexity_delta_vs_merged"] == pytest.approx(0.1)
    assert "text_perplexity_delta_vs_merged" not in arts["adapter"] and "text_perplexity_delta_vs_merged" not in arts["merged"]
    arts = {"merged": {"status": "skipped"}, "awq": {"text_perplexity": 11.0}}
    add_text_deltas(arts)
    assert arts["awq"]["text_perplexity_delta_vs_merged"] is None


@pytest.mark.slow
def test_the_bounds_the_run_passes_are_recorded(evaluated_general):
    root, result = evaluated_general
    assert result.code == 0, result.output
    bounds = [(b["key"], b["artifact"], b["value"], b["bound"], b["passed"]) for b in _metrics(root)["thresholds"]]
    assert bounds == [
        ("eval.max_base_pass_rate", "base", 0.0, 0.3, True),
        ("eval.min_tuned_pass_rate", "adapter", pytest.approx(2 / 3), 0.6, True),
        ("eval.min_tuned_pass_rate", "merged", pytest.approx(2 / 3), 0.6, True),
        ("eval.min_general_kept", "adapter", 0.5, 0.5, True),
        ("eval.min_general_kept", "merged", 0.5, 0.5, True),
    ]


@pytest.mark.slow
def test_a_missed_bound_fails_the_stage_after_writing_the_results(evaluated_general, tmp_path):
    src, _ = evaluated_general
    root = copy_project(src, tmp_path / "proj")
    result = cli("eval-sft", root, "--run", RUN, "--set", "eval.artifacts=[base, adapter]",
                 "--set", "eval.min_tuned_pass_rate=0.8", "--set", "eval.min_general_kept=0.75")
    assert result.code == 1, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line == (
        "error: eval-sft: eval.min_tuned_pass_rate: adapter passed 0.667 (2/3 checks) < 0.8; "
        "eval.min_general_kept: adapter general_kept 0.5 < 0.75; results in outputs/r1/eval/metrics.json "
        "(next: see outputs/r1/eval/generations.jsonl)"
    )
    doc = _metrics(root)
    assert doc["artifacts"]["adapter"]["checks_passed"] == 2 and doc["artifacts"]["merged"]["reason"] == "not in eval.artifacts"
    assert [(b["key"], b["passed"]) for b in doc["thresholds"]] == [
        ("eval.max_base_pass_rate", True), ("eval.min_tuned_pass_rate", False), ("eval.min_general_kept", False)]
    assert (root / "outputs" / RUN / "eval" / "generations.jsonl").stat().st_size > 0
    manifest = json.loads((root / "logs" / RUN / "eval-sft" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["error"] == line.removeprefix("error: ")


def test_a_bound_without_what_it_bounds_is_refused_up_front(tmp_path, tiny_model_dir):
    from tests.eval.test_evaluate import _bare_run

    root = _bare_run(tmp_path, tiny_model_dir, finetuned=True)
    result = cli("eval-sft", root, "--run", RUN, "--set", "eval.prompts_file=null", "--set", "eval.min_tuned_pass_rate=0.8",
                 "--set", "eval.min_general_kept=0.9", "--set", "eval.max_text_perplexity_delta=0.1",
                 "--set", "eval.artifacts=[adapter, awq]")
    assert result.code == 2, result.output
    for part in ("eval.min_tuned_pass_rate: needs eval.prompts_file", "eval.min_general_kept: needs eval.general_file",
                 "eval.min_general_kept: needs base in eval.artifacts",
                 "eval.max_text_perplexity_delta: needs eval.perplexity_file",
                 "eval.max_text_perplexity_delta: needs merged in eval.artifacts"):
        assert part in result.stderr
    assert not (root / "logs" / RUN / "eval-sft").exists()


def _ok(passed: int, total: int = 10, **more) -> dict:
    return {"status": "ok", "checks_passed": passed, "checks_total": total, **more}


def test_which_artifacts_each_bound_applies_to():
    from ftpipe.eval.config import EvalConfig
    from ftpipe.eval.eval_sft import threshold_results

    cfg = EvalConfig(prompts_file="p.yaml", general_file="g.yaml", perplexity_file="t.txt", max_base_pass_rate=0.3,
                     min_tuned_pass_rate=0.8, min_general_kept=0.9, max_text_perplexity_delta=0.1)
    arts = {"base": _ok(3), "adapter": _ok(8, general_kept=0.95), "dpo_adapter": {"status": "skipped", "reason": "x"},
            "merged": _ok(7, general_kept=None), "awq": _ok(1, text_perplexity_delta_vs_merged=0.25)}
    assert [b["message"] for b in threshold_results(cfg, arts)] == [
        "eval.max_base_pass_rate: base passed 0.3 (3/10 checks) <= 0.3",
        "eval.min_tuned_pass_rate: adapter passed 0.8 (8/10 checks) >= 0.8",
        "eval.min_tuned_pass_rate: merged passed 0.7 (7/10 checks) < 0.8",
        "eval.min_general_kept: adapter general_kept 0.95 >= 0.9",
        "eval.min_general_kept: merged general_kept None (the base passed none of the general checks, or was not evaluated)",
        "eval.max_text_perplexity_delta: awq text_perplexity_delta_vs_merged +0.25 > 0.1",
    ]
    assert [b["passed"] for b in threshold_results(cfg, arts)] == [True, True, False, True, False, False]
    arts = {"base": {"status": "failed", "error": "OSError: gone"}, "adapter": {"status": "failed", "error": "e"},
            "merged": {"status": "skipped", "reason": "not produced"}, "awq": {"status": "skipped", "reason": "y"}}
    assert [b["message"] for b in threshold_results(cfg, arts)] == [
        "eval.max_base_pass_rate: base not evaluated (OSError: gone)",
        "eval.min_tuned_pass_rate: no tuned artifact (adapter, dpo_adapter, merged) was evaluated",
        "eval.min_general_kept: no tuned artifact (adapter, dpo_adapter, merged) was evaluated",
    ]
    assert threshold_results(EvalConfig(), arts) == []
