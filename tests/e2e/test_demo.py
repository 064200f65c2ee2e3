"""End-to-end: the demo pipeline with a smaller budget, every manifest `completed`; a second run
skips every stage; `--force` reruns every stage; changing one training value reruns training and
what follows, nothing before.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import REPO, run_cli

pytestmark = pytest.mark.slow

SMALL = ["--set", "finetune.max_steps=80", "--set", "awq.calibration_samples=16", "--set", "smoke_test.min_check_pass_rate=0.6"]


@pytest.fixture(scope="module")
def demo_project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo-project")
    shutil.copy(REPO / "debug_config.yaml", root / "debug_config.yaml")
    shutil.copytree(REPO / "data/demo", root / "data/demo")
    return root


def stamps(root: Path) -> dict[str, tuple]:
    out = {}
    for path in sorted(root.glob("logs/**/manifest.json")):
        m = json.loads(path.read_text())
        out[str(path.relative_to(root))] = (m["status"], m["started_at"], m["finished_at"])
    return out


@pytest.fixture(scope="module")
def first_run(demo_project: Path):
    result = run_cli("demo", "--config", str(demo_project / "debug_config.yaml"), *SMALL, timeout=1800)
    assert result.code == 0, result.output[-4000:]
    return result


def test_demo_completes_every_stage(demo_project: Path, first_run) -> None:
    manifests = stamps(demo_project)
    stages = {Path(p).parent.name for p in manifests}
    assert {"sentiment", "preference", "finetune-sft", "finetune-dpo", "export-merged", "convert-awq", "eval-sft",
            "smoke-test", "report"} <= stages
    assert all(status == "completed" for status, _, _ in manifests.values()), manifests
    run = demo_project / "outputs/demo"
    for sub in ("adapter", "dpo_adapter", "merged", "awq", "eval", "report.html"):
        assert (run / sub).exists(), sub
    assert (demo_project / "outputs/latest.txt").read_text().strip() == "demo"
    # The fine-tune learned what the base cannot: held-out prompts, in-process and over the API.
    artifacts = json.loads((run / "eval/metrics.json").read_text())["artifacts"]
    base = artifacts["base"]
    assert base["checks_total"] == 20 and base["checks_passed"] / base["checks_total"] <= 0.2
    served = json.loads((demo_project / "logs/demo/smoke-test/results.json").read_text())["prompt_checks"]
    assert len(served) == 20 and sum(c["passed"] for c in served) / 20 >= 0.6
    assert 'id="served-accuracy"' in (run / "report.html").read_text()
    # Which artifact was served and why (debug_config.yaml: merged; `ftpipe run` would name what
    # replaced an AWQ this CPU cannot serve: tests/serve/test_serve_awq.py).
    assert 'Served artifact: <b>merged</b> (serve.artifact)' in (run / "report.html").read_text()
    # The preference step moved what SFT did not: held-out pairs, chosen scored above rejected.
    sft, dpo = artifacts["adapter"], artifacts["dpo_adapter"]
    assert sft["preference_pairs"] == dpo["preference_pairs"] == 60
    assert dpo["preference_accuracy"] >= 0.85 and dpo["preference_accuracy"] >= sft["preference_accuracy"] + 0.1, (sft, dpo)
    assert 'id="sft-vs-dpo"' in (run / "report.html").read_text()


def test_second_run_skips_everything(demo_project: Path, first_run) -> None:
    before = stamps(demo_project)
    result = run_cli("demo", "--config", str(demo_project / "debug_config.yaml"), *SMALL, timeout=900)
    assert result.code == 0, result.output[-3000:]
    assert stamps(demo_project) == before
    assert result.stdout.count(": skipped") >= 6 and ": completed" not in result.stdout
    # Up-to-date stages are skipped by the pipeline's own check: no interpreter per stage (the awq
    # one alone took 13 s to import llm-compressor). Only finetune-sft, whose pre-flight opens a
    # run, still starts in its environment (the executor logs each start on stderr).
    started = re.findall(r"running (\S+) in environment", result.stderr)
    assert started == ["finetune-sft"], result.stderr[-3000:]


def test_force_reruns_every_stage_through_serve_and_report(demo_project: Path, first_run) -> None:
    """`demo --force` reruns every stage it runs, the server step and the report included (each
    command gets --force only if it takes it: smoke-test has no such option). From export-merged
    on: the stages before it take --force the same way (tests/core/test_pipeline.py builds every
    command of a forced run and parses it against the CLI; tests/core/test_stage.py reruns a forced
    stage; preprocess-sft --force runs in tests/docs), and rerunning the two trainings here took a
    minute of the suite's budget."""
    before = stamps(demo_project)
    result = run_cli("demo", "--config", str(demo_project / "debug_config.yaml"), *SMALL, "--force",
                     "--from", "export-merged", timeout=1800)
    assert result.code == 0, result.output[-4000:]
    assert ": skipped" not in result.stdout, result.stdout[-3000:]
    for stage in ("export-merged", "convert-awq", "eval-sft", "export-gguf", "serve", "report"):
        assert f"{stage}: completed" in result.stdout, stage
    after = stamps(demo_project)
    assert set(after) == set(before)
    rerun = {"export-merged", "convert-awq", "eval-sft", "export-gguf", "smoke-test", "report"}  # serve: no manifest
    assert {Path(key).parent.name for key in after} >= rerun
    for key, (status, started, _) in after.items():
        assert status == "completed", key
        assert (started != before[key][1]) == (Path(key).parent.name in rerun), key


def test_training_change_reruns_training_and_after_only(demo_project: Path, first_run) -> None:
    before = stamps(demo_project)
    changed = [*SMALL, "--set", "finetune.learning_rate=0.002"]
    result = run_cli("demo", "--config", str(demo_project / "debug_config.yaml"), *changed, "--to", "export-merged", timeout=1800)
    assert result.code == 0, result.output[-3000:]
    after = stamps(demo_project)
    prep = "logs/_prepared/sentiment/manifest.json"
    assert after[prep] == before[prep]  # nothing before training reran
    for stage in ("finetune-sft", "export-merged"):
        key = f"logs/demo/{stage}/manifest.json"
        assert after[key][0] == "completed" and after[key][1] != before[key][1], stage
