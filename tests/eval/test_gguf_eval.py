"""eval-sft's GGUF artifacts: export-gguf's q8_0 file of the tuned tiny model measured with llama.cpp
in the gguf environment (`ftpipe.eval.gguf` through `python -m ftpipe.eval.worker`), next to the
merged model it was converted from.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/eval/test_gguf_eval.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.dpo_fixture import copy_project
from tests.eval.conftest import RUN, cli


def _metrics(root: Path) -> dict:
    return json.loads((root / "outputs" / RUN / "eval" / "metrics.json").read_text(encoding="utf-8"))


@pytest.mark.slow
def test_gguf_q8_0_is_measured_in_llama_cpp_like_merged(evaluated_general, tmp_path):
    src, _ = evaluated_general  # general checks, held-out text, bounds (tests/eval/test_general_text.py)
    root = copy_project(src, tmp_path / "proj")
    exported = cli("export-gguf", root, "--run", RUN, "--set", "gguf.outtypes=[q8_0]")
    assert exported.code == 0, exported.output
    result = cli("eval-sft", root, "--run", RUN, "--set", "eval.artifacts=[base, merged, gguf_q8_0, gguf_q4_k_m]",
                 "--set", "eval.max_text_perplexity_delta=0.05")
    assert result.code == 0, result.output
    doc = _metrics(root)
    arts = doc["artifacts"]
    merged, q8 = arts["merged"], arts["gguf_q8_0"]
    assert q8["status"] == "ok", q8
    assert (q8["environment"], q8["model"]) == ("gguf", "outputs/r1/gguf/model-q8_0.gguf")
    assert q8["versions"]["llama_cpp_python"] and q8["file_bytes"] > 0
    # The same token ids scored: val assistant tokens and held-out text tokens; q8_0 barely moves them.
    assert (q8["assistant_tokens"], q8["val_rows"], q8["mask_method"]) == (160, 80, "generation-tags")
    assert (q8["text_tokens"], q8["text_windows"]) == (merged["text_tokens"], merged["text_windows"])
    assert q8["perplexity"] == pytest.approx(merged["perplexity"], rel=0.01)
    assert q8["text_perplexity"] == pytest.approx(merged["text_perplexity"], rel=0.01)
    assert q8["text_perplexity_delta_vs_merged"] == pytest.approx(
        (q8["text_perplexity"] - merged["text_perplexity"]) / merged["text_perplexity"])
    assert abs(q8["text_perplexity_delta_vs_merged"]) < 0.01
    # Greedy answers from the HF chat template's ids, stopped at the end-of-turn ids: merged's answers.
    rows = [json.loads(line) for line in (root / "outputs" / RUN / "eval" / "generations.jsonl").read_text().splitlines()]
    answers = {(r["artifact"], r["kind"], r["name"]): (r["output"], r["stopped"], r["new_tokens"]) for r in rows}
    for (artifact, kind, name), answer in answers.items():
        if artifact == "merged":
            assert answers[("gguf_q8_0", kind, name)] == answer, (kind, name)
    assert (q8["checks_passed"], q8["general_passed"], q8["general_kept"]) == (2, 2, 0.5)
    assert arts["gguf_q4_k_m"] == {"status": "skipped",
                                   "reason": "not produced (ftpipe export-gguf --run r1, with q4_k_m in gguf.outtypes)"}
    assert arts["gguf_f16"] == {"status": "skipped", "reason": "not in eval.artifacts"}
    assert ("eval.max_text_perplexity_delta", "gguf_q8_0", True) in [(b["key"], b["artifact"], b["passed"]) for b in doc["thresholds"]]
    manifest = json.loads((root / "logs" / RUN / "eval-sft" / "manifest.json").read_text())
    assert "gguf" in manifest["inputs"] and "gguf_environment" in manifest["inputs"]
    assert (root / "logs" / RUN / "eval-sft" / "gguf-worker.log").is_file()
    assert not list((root / "outputs" / RUN / "eval").glob("gguf-*.json"))  # spec and result cleaned up
