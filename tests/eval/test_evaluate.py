"""`ftpipe eval-sft`: the tiny model before and after a real LoRA fine-tune, side by side.

The session fixture `tuned_project` trains 100 real TRL steps (see conftest.py); these tests run
the CLI in a subprocess (real exit codes) and read outputs/<run>/eval/.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from stage_record import record_stage

from tests.eval.conftest import RUN, cli, make_project

REPO = Path(__file__).resolve().parents[2]
AWQ_MISSING = "awq environment not installed (bash scripts/bootstrap.sh awq)"


def _metrics(root: Path) -> dict:
    return json.loads((root / "outputs" / RUN / "eval" / "metrics.json").read_text(encoding="utf-8"))


def _checks(artifact: dict) -> dict[str, bool]:
    return {c["name"]: c["passed"] for c in artifact["checks"]}


@pytest.mark.slow
def test_tuned_beats_base_and_checks_pass_or_fail_as_the_yaml_says(evaluated):
    root, result = evaluated
    assert result.code == 0, result.output
    arts = _metrics(root)["artifacts"]
    assert list(arts) == ["base", "adapter", "dpo_adapter", "merged", "awq", "gguf_f16", "gguf_q8_0", "gguf_q4_k_m"]
    base, adapter, merged = arts["base"], arts["adapter"], arts["merged"]
    assert base["status"] == adapter["status"] == merged["status"] == "ok"
    # Perplexity over assistant tokens only (label + end-of-turn: 2 per val row).
    assert base["assistant_tokens"] == adapter["assistant_tokens"] == 160
    assert adapter["perplexity"] < base["perplexity"] / 2
    assert merged["perplexity"] == pytest.approx(adapter["perplexity"], rel=1e-3)
    assert adapter["mask_method"] == "generation-tags"
    # The YAML: two label checks the tuned model must pass, one nobody can pass.
    assert _checks(base) == {"label-positive": False, "label-negative": False, "impossible": False}
    assert _checks(adapter) == {"label-positive": True, "label-negative": True, "impossible": False}
    assert _checks(merged) == _checks(adapter)
    assert (adapter["checks_passed"], adapter["checks_total"]) == (2, 3)
    # The project has no .venv-awq and no awq output: reported, never silently dropped.
    assert arts["awq"] == {"status": "skipped", "reason": "not produced (ftpipe convert-awq --run r1)"}
    assert arts["dpo_adapter"] == {"status": "skipped", "reason": "not produced (ftpipe finetune-dpo --run r1)"}
    assert arts["gguf_q8_0"] == {"status": "skipped", "reason": "not in eval.artifacts"}  # GGUFs: asked for by name
    assert "eval-sft: evaluated base, adapter, merged; skipped dpo_adapter, awq, gguf_f16, gguf_q8_0, gguf_q4_k_m" in result.stdout
    # No preference set in this config: the preference column is "-" with the reason, no failure.
    assert _metrics(root)["preference"] == {"status": "skipped", "reason": "no preference set (preference.source is not set)"}
    assert "preference accuracy: - (no preference set (preference.source is not set))" in result.stdout
    assert "artifacts side by side" in result.stdout
    assert "not produced (ftpipe" in result.stdout


@pytest.mark.slow
def test_generations_and_manifest(evaluated):
    root, _ = evaluated
    rows = [json.loads(line) for line in (root / "outputs" / RUN / "eval" / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * (3 + 2)  # 3 artifacts x (3 checks + 2 samples)
    by = {(r["artifact"], r["name"]): r for r in rows}
    tuned = by[("adapter", "label-positive")]
    assert (tuned["output"], tuned["stopped"], tuned["passed"], tuned["new_tokens"]) == ("positive", True, True, 2)
    assert by[("adapter", "impossible")]["failures"] == ["contains: missing 'this sentence is never generated'"]
    base = by[("base", "label-positive")]
    assert base["stopped"] is False and base["new_tokens"] == 8  # eval.max_new_tokens
    assert base["failures"][-1] == "must_stop: no end-of-turn token before max_new_tokens"
    sample = by[("merged", "val-0")]
    assert sample["kind"] == "sample" and sample["output"] == sample["reference"]
    manifest = json.loads((root / "logs" / RUN / "eval-sft" / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert manifest["metrics"]["perplexity"] == _metrics(root)["artifacts"]["adapter"]["perplexity"]
    assert manifest["metrics"]["artifacts"]["awq"]["status"] == "skipped"
    assert {o["path"] for o in manifest["outputs"]} == {"outputs/r1/eval/metrics.json", "outputs/r1/eval/generations.jsonl"}


@pytest.mark.slow
def test_second_run_is_up_to_date(evaluated):
    root, _ = evaluated
    again = cli("eval-sft", root, "--run", RUN)
    assert again.code == 0, again.output
    assert "eval-sft: up to date, skipped (use --force to rerun)" in again.stdout
    assert "artifacts side by side" in again.stdout  # the table comes from the manifest


@pytest.mark.slow
def test_awq_runs_in_the_awq_environment(evaluated, tmp_path):
    """A stand-in AWQ artifact (the merged model, under a completed convert-awq manifest) is
    skipped with the install command while .venv-awq is absent, then evaluated by the worker
    in the real .venv-awq once it exists, and merged into the same metrics."""
    src, _ = evaluated
    root = tmp_path / "proj"
    shutil.copytree(src, root, symlinks=True)
    from ftpipe.config import load_config
    from ftpipe.core.runs import Project, RunDir
    from ftpipe.core.stage import StageResult

    loaded = load_config(root / "config.yaml")
    run = RunDir(Project.from_config(loaded), RUN)

    def fake_awq(ctx):
        shutil.copytree(run.merged, run.awq)
        return StageResult(outputs=[run.awq])

    record_stage("convert-awq", loaded, run, fake_awq)
    only = ("--set", "eval.artifacts=[merged, awq]")

    # Venvs are looked up in FTPIPE_VENV_ROOT: the project, which has .venv but no .venv-awq.
    missing = cli("eval-sft", root, "--run", RUN, *only, env={"FTPIPE_VENV_ROOT": str(root)})
    assert missing.code == 0, missing.output
    assert _metrics(root)["artifacts"]["awq"] == {"status": "skipped", "reason": AWQ_MISSING}
    assert "bootstrap.sh awq" in missing.stdout

    assert (REPO / ".venv-awq" / "bin" / "python").exists(), "the awq environment is needed: bash scripts/bootstrap.sh awq"
    (root / ".venv-awq").symlink_to(REPO / ".venv-awq", target_is_directory=True)
    result = cli("eval-sft", root, "--run", RUN, *only, env={"FTPIPE_VENV_ROOT": str(root)})
    assert result.code == 0, result.output
    arts = _metrics(root)["artifacts"]
    assert arts["awq"]["status"] == "ok", arts["awq"]
    assert arts["awq"]["environment"] == "awq" and arts["merged"]["environment"] == "train"
    assert arts["awq"]["model"] == "outputs/r1/awq"
    assert arts["awq"]["perplexity"] == pytest.approx(arts["merged"]["perplexity"], rel=1e-3)
    assert _checks(arts["awq"]) == _checks(arts["merged"])
    assert arts["base"]["reason"] == "not in eval.artifacts"
    awq_transformers = subprocess.run(
        [str(REPO / ".venv-awq/bin/python"), "-c", "import transformers; print(transformers.__version__)"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert arts["awq"]["versions"]["transformers"] == awq_transformers  # it really ran over there
    assert (root / "logs" / RUN / "eval-sft" / "awq-worker.log").is_file()
    assert not list((root / "outputs" / RUN / "eval").glob("awq-*.json"))  # spec and result cleaned up


@pytest.mark.slow
def test_a_broken_artifact_fails_the_stage_but_the_others_are_kept(evaluated, tmp_path):
    src, _ = evaluated
    root = tmp_path / "proj"
    shutil.copytree(src, root, symlinks=True)
    weights = root / "outputs" / RUN / "merged" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # torn copy
    result = cli("eval-sft", root, "--run", RUN, "--set", "eval.artifacts=[adapter, merged]")
    assert result.code == 1, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: eval-sft: merged failed (merged: ")
    assert line.endswith("partial results in outputs/r1/eval/metrics.json (next: see logs/r1/eval-sft/run.log)")
    arts = _metrics(root)["artifacts"]
    assert arts["adapter"]["status"] == "ok" and arts["merged"]["status"] == "failed"
    manifest = json.loads((root / "logs" / RUN / "eval-sft" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["error"] == line.removeprefix("error: ")


def _bare_run(tmp_path, tiny_model_dir, finetuned: bool):
    """A project with run r1 and, optionally, a completed finetune-sft (adapter reference only)."""
    root = make_project(tmp_path / "proj", tiny_model_dir)
    from ftpipe.config import load_config
    from ftpipe.core.runs import Project, new_run
    from ftpipe.core.stage import StageResult

    loaded = load_config(root / "config.yaml")
    run = new_run(Project.from_config(loaded), RUN)
    if finetuned:
        def body(ctx):
            run.adapter.mkdir(parents=True)
            (run.adapter / "ftpipe_base_model.json").write_text('{"id": null, "revision": null, "path": "models/gone"}')
            return StageResult(outputs=[run.adapter])

        record_stage("finetune-sft", loaded, run, body)
    return root


def test_needs_a_completed_finetune(tmp_path, tiny_model_dir):
    root = _bare_run(tmp_path, tiny_model_dir, finetuned=False)
    result = cli("eval-sft", root, "--run", RUN)
    assert result.code == 2
    assert result.stderr.strip() == (
        "error: run r1: stage finetune-sft is missing (logs/r1/finetune-sft/manifest.json) "
        "(next: ftpipe finetune-sft --run r1)"
    )


def test_preflight_lists_every_problem(tmp_path, tiny_model_dir):
    root = _bare_run(tmp_path, tiny_model_dir, finetuned=True)
    (root / "prepared" / "sentiment" / "val.jsonl").unlink()
    (root / "eval_checks.yaml").write_text("checks:\n  - name: x\n    prompt: p\n    expect: {regex: '['}\n")
    result = cli("eval-sft", root, "--run", RUN)
    assert result.code == 2
    assert result.stderr.strip() == (
        "error: no val split prepared/sentiment/val.jsonl; "
        "outputs/r1/adapter/ftpipe_base_model.json: base model: model.path models/gone: no config.json there; "
        "eval_checks.yaml: checks[0].expect.regex: invalid regular expression "
        "(unterminated character set at position 0) "
        "(next: ftpipe preprocess-sft, then ftpipe eval-sft --run r1)"
    )
    assert not (root / "logs" / RUN / "eval-sft" / "manifest.json").exists()  # nothing started


def test_lm_eval_tasks_without_lm_eval(tmp_path, tiny_model_dir):
    import importlib.util

    assert importlib.util.find_spec("lm_eval") is None  # this test is about the missing package
    root = _bare_run(tmp_path, tiny_model_dir, finetuned=True)
    shutil.copytree(root / "models" / "tiny", root / "models" / "gone")
    result = cli("eval-sft", root, "--run", RUN, "--set", "eval.lm_eval_tasks=[hellaswag]")
    assert result.code == 2
    assert result.stderr.strip() == (
        "error: eval.lm_eval_tasks = ['hellaswag'] but lm-evaluation-harness is not installed in this "
        "environment (next: `.venv/bin/pip install lm-eval`, or --set eval.lm_eval_tasks=[])"
    )
