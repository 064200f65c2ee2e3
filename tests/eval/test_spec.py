"""The eval spec: built from the `eval` config, typed across the hop to `python -m ftpipe.eval.worker`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from ftpipe.eval.config import EvalConfig
from ftpipe.eval.eval_sft import Artifact, EvalSftPlan, eval_spec
from ftpipe.eval.spec import ArtifactSpec, EvalSpec, PromptCheck

CHECK = {"name": "label", "system": None, "prompt": "Great kettle.", "expect": {"exact": "positive", "must_stop": True}}


def _spec(tmp_path) -> EvalSpec:
    return EvalSpec(
        artifacts=[ArtifactSpec(name="base", model="models/tiny", tokenizer="outputs/r1/adapter"),
                   ArtifactSpec(name="adapter", model="models/tiny", revision="abc123", tokenizer="outputs/r1/adapter",
                                adapter="outputs/r1/adapter")],
        environment="awq", val_file=tmp_path / "val.jsonl", max_val_rows=7, max_length=512, batch_tokens=1024,
        checks=[CHECK], max_new_tokens=8, samples=2, generate_batch_size=4, dtype="float32",
    )


def test_round_trip_through_json(tmp_path):
    spec = _spec(tmp_path)
    spec.write(tmp_path / "spec.json")
    back = EvalSpec.read(tmp_path / "spec.json")
    assert back == spec
    assert isinstance(back.val_file, Path) and isinstance(back.checks[0], PromptCheck)
    assert back.artifacts[1].adapter == "outputs/r1/adapter" and back.checks[0].expect == CHECK["expect"]


def test_the_stage_builds_the_spec_from_the_eval_config(tmp_path):
    """Every setting comes from the `eval` section (none is a default repeated where the spec is read)."""
    cfg = EvalConfig(max_val_rows=5, max_length=300, batch_tokens=999, max_new_tokens=4, samples=1, max_pairs=7,
                     generate_batch_size=3)
    ctx = SimpleNamespace(config=SimpleNamespace(eval=cfg, model=SimpleNamespace(dtype="bfloat16")))
    art = Artifact("merged", model="outputs/r1/merged", tokenizer="outputs/r1/merged")
    general = {**CHECK, "name": "general-1"}
    plan = EvalSftPlan(val_file=tmp_path / "val.jsonl", prompts_file=None, checks=(CHECK,),
                       general_file=tmp_path / "general.yaml", general=(general,),
                       perplexity_file=tmp_path / "heldout.txt",
                       pairs_file=tmp_path / "pairs.jsonl", preference={}, artifacts=(art,))
    spec = eval_spec(ctx, plan, [art], "train")
    assert spec.artifacts == [ArtifactSpec(name="merged", model="outputs/r1/merged", tokenizer="outputs/r1/merged")]
    assert (spec.max_val_rows, spec.max_length, spec.batch_tokens, spec.max_new_tokens, spec.samples,
            spec.generate_batch_size) == (
        cfg.max_val_rows, cfg.max_length, cfg.batch_tokens, cfg.max_new_tokens, cfg.samples, cfg.generate_batch_size)
    assert (spec.environment, spec.dtype, spec.val_file) == ("train", "bfloat16", tmp_path / "val.jsonl")
    assert spec.checks == [PromptCheck(**CHECK)]
    assert spec.general == [PromptCheck(**general)] and spec.perplexity_file == tmp_path / "heldout.txt"
    assert (spec.pairs_file, spec.max_pairs) == (tmp_path / "pairs.jsonl", 7)


def _bad(data: dict, case: str) -> dict:
    if case == "unknown key":
        data["max_len"] = 100
    elif case == "wrong type":
        data["max_new_tokens"] = "many"
    elif case == "missing setting":
        del data["batch_tokens"]
    elif case == "artifact without model":
        del data["artifacts"][0]["model"]
    elif case == "no artifacts":
        data["artifacts"] = []
    return data


@pytest.mark.parametrize("case, named", [
    ("unknown key", "max_len: Extra inputs are not permitted"),
    ("wrong type", "max_new_tokens: Input should be a valid integer"),
    ("missing setting", "batch_tokens: Field required"),
    ("artifact without model", "artifacts.0.model: Field required"),
    ("no artifacts", "artifacts: List should have at least 1 item"),
    ("not JSON", "<root>: Invalid JSON"),
])
def test_the_worker_refuses_a_bad_spec_with_exit_2_and_one_line(tmp_path, case, named):
    spec_file, out = tmp_path / "awq-spec.json", tmp_path / "awq-result.json"
    _spec(tmp_path).write(spec_file)
    if case == "not JSON":
        spec_file.write_text("{", encoding="utf-8")
    else:
        spec_file.write_text(json.dumps(_bad(json.loads(spec_file.read_text(encoding="utf-8")), case)), encoding="utf-8")
    env = {**os.environ, "FTPIPE_WORKER_LOG": str(tmp_path / "run.log")}
    proc = subprocess.run([sys.executable, "-m", "ftpipe.eval.worker", "--spec", str(spec_file), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("[eval worker] ") and " ERROR " in lines[0]
    assert f"eval spec {spec_file}: invalid: " in lines[0] and named in lines[0]
    assert not out.exists()
    # The same line, in the stage's run.log format, appended to the run.log the stage named.
    assert (tmp_path / "run.log").read_text(encoding="utf-8").splitlines() == [lines[0].removeprefix("[eval worker] ")]
