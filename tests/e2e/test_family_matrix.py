"""The family x stage matrix: every stage, run by its CLI command, on tiny models of six real families
(real tokenizers and chat templates, `make-tiny-model --family`), each cell green or a tested
refusal. The results are written to build/family-matrix.json with this session's stamp;
docs/families.md's table must say the same (tests/e2e/test_family_matrix_docs.py, collected after
this file), so the page is written from this tier's own results.

Per family: the demo data; finetune-sft for 40 steps (enough to learn the one-word answers and
the end-of-turn token: smoke-test requires answers that stop); each later stage as a user runs it.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import pytest

from conftest import FAMILY_NAMES, REPO, run_cli
from family_matrix import REFUSALS, RESULTS, STAGES

pytestmark = pytest.mark.slow

PORTS = {name: 8840 + i for i, name in enumerate(FAMILY_NAMES)}

CONFIG = """\
model:
  path: {model}
data:
  name: sentiment
  source: data/demo/sentiment.jsonl
preprocess:
  val_fraction: 0.1
  max_length: 256
finetune:
  lora_r: 16
  lora_alpha: 32
  lora_dropout: 0.0
  max_length: 256
  max_steps: 40
  batch_size: 8
  learning_rate: 2.0e-3
  warmup_ratio: 0.0
  logging_steps: 10
  save_steps: 40
awq:
  n_grid: 4
  calibration_samples: 8
  calibration_max_length: 64
eval:
  artifacts: [base, merged]     # awq: convert-awq's cell reloads its files and measures them per family
  prompts_file: data/demo/eval_prompts.json
  max_new_tokens: 6
  max_val_rows: 20
gguf:
  outtypes: [f16]
  verify_prompts: 2
serve:
  artifact: merged
  port: {port}
  startup_timeout: 600
  extra_args: [--enforce-eager]
smoke_test:
  prompts: 2
  max_tokens: 8
  min_check_pass_rate: 0.0
ollama:
  gguf: f16
run:
  stages: [preprocess-sft, finetune-sft, export-merged, convert-awq, eval-sft, export-gguf, serve, report]
runtime:
  mode: local
"""


def _cell(result, seconds: float) -> dict:
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    return {"code": result.code, "seconds": round(seconds, 1), "error": lines[-1] if lines else None,
            "tail": result.output[-2500:]}


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def matrix_row(request, tmp_path_factory, family_model, session_stamp) -> tuple[str, Path, dict]:
    """Run every stage once for one family; each command's exit code, error line and time."""
    name = request.param
    root = tmp_path_factory.mktemp(f"matrix-{name}")
    shutil.copytree(REPO / "data/demo", root / "data/demo")
    cfg = root / "config.yaml"
    cfg.write_text(CONFIG.format(model=family_model(name), port=PORTS[name]), encoding="utf-8")
    common = ["--config", str(cfg)]
    run = ["--run", "m"]
    commands = {
        "preprocess-sft": ["preprocess-sft", *common],
        "finetune-sft": ["finetune-sft", *common, *run],
        "export-merged": ["export-merged", *common, *run],
        "convert-awq": ["convert-awq", *common, *run],
        "eval-sft": ["eval-sft", *common, *run],
        "export-gguf": ["export-gguf", *common, *run],
        "ollama-template": ["ollama-load", *common, *run, "--dry-run"],
        "serve+smoke": ["run", *common, *run, "--from", "serve", "--to", "serve"],
        "report": ["report", *common, *run],
    }
    row = {}
    for stage, argv in commands.items():
        started = time.monotonic()
        row[stage] = _cell(run_cli(*argv, cwd=root, timeout=1500), time.monotonic() - started)
    _record(name, row, session_stamp)
    return name, root, row


def _record(name: str, row: dict, session: str) -> None:
    RESULTS.parent.mkdir(exist_ok=True)
    data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    data[name] = {stage: {k: v for k, v in cell.items() if k != "tail"} for stage, cell in row.items()}
    data[name]["session"] = session
    RESULTS.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")


@pytest.mark.parametrize("stage", STAGES)
def test_cell(matrix_row, stage: str) -> None:
    name, root, row = matrix_row
    cell = row[stage]
    refusal = REFUSALS.get((name, stage))
    if refusal:
        assert cell["code"] == 2 and cell["error"] and refusal in cell["error"], cell["tail"]
        assert cell["error"].count("\n") == 0
        return
    assert cell["code"] == 0, f"{name} x {stage}: {cell['tail']}"


def test_cells_hold_what_they_claim(matrix_row, family_model) -> None:
    """The green cells did the work: manifests completed, the GGUF's tokenizer equals HF's, vLLM
    built the same prompt tokens, answers stopped at end-of-turn, the loss went down."""
    name, root, row = matrix_row
    logs = root / "logs" / "m"
    if row["finetune-sft"]["code"] == 0:
        metrics = json.loads((logs / "finetune-sft/manifest.json").read_text())["metrics"]
        assert metrics["last_logged_loss"] < metrics["first_logged_loss"], metrics
        assert metrics["assistant_turns_unlocated"] == 0 and metrics["target_tokens"] > 0, metrics
        # Every family trains through the CPU path that scores the LM head at labelled positions only.
        assert "LM head at the labelled positions only" in (logs / "finetune-sft/run.log").read_text()
    if row["export-merged"]["code"] == 0:
        _merged_is_base_plus_adapter(name, family_model(name), root / "outputs/m")
    if row["convert-awq"]["code"] == 0:  # the files as written, reloaded (compressed-tensors) and measured
        awq = json.loads((logs / "convert-awq/manifest.json").read_text())["metrics"]
        assert math.isfinite(awq["awq_perplexity"]) and awq["awq_perplexity"] > 0, awq
    if row["export-gguf"]["code"] == 0:
        gguf = json.loads((logs / "export-gguf/manifest.json").read_text())["metrics"]
        assert gguf["f16_tokenization_equal"] is True and gguf["f16_chat_template_roundtrip_equal"] is True, gguf
        assert gguf["f16_end_of_turn_ids"] == _end_of_turn_ids(name, family_model(name)), gguf
    if row["serve+smoke"]["code"] == 0:
        smoke = json.loads((logs / "smoke-test/results.json").read_text())
        assert smoke["chat_template"]["equal"] is True, smoke["chat_template"]
        assert all(a["finish_reason"] == "stop" for a in smoke["answers"]), smoke["answers"]
    if row["eval-sft"]["code"] == 0:
        artifacts = json.loads((root / "outputs/m/eval/metrics.json").read_text())["artifacts"]
        # The AWQ files are reloaded and measured per family by convert-awq itself (its manifest's
        # awq_perplexity, above); eval-sft's awq worker runs in the demo (tests/e2e/test_demo.py).
        evaluated = {a for a, v in artifacts.items() if v.get("perplexity") is not None}
        assert evaluated == {"base", "merged"}, artifacts
        assert artifacts["merged"]["perplexity"] < artifacts["base"]["perplexity"], artifacts
    if row["ollama-template"]["code"] == 0:
        assert list((root / "outputs/m").rglob("Modelfile*")), "the dry run writes the Modelfile"


def _end_of_turn_ids(name: str, folder: Path) -> list[int]:
    from transformers import AutoTokenizer

    from ftpipe.training.families import end_of_turn_ids, family

    return end_of_turn_ids(family(name), AutoTokenizer.from_pretrained(folder))


def _merged_is_base_plus_adapter(name: str, base: Path, run: Path) -> None:
    """Recomputed here, not read from the stage: merged logits equal base + adapter on a text with
    non-ASCII and the end-of-turn token; ties as the family ships them; every tokenizer file of the
    base carried; generation_config stops at every end-of-turn id."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from ftpipe.training.families import family

    merged = run / "merged"
    for f in ("tokenizer.json", "tokenizer.model", "chat_template.jinja"):
        assert (merged / f).is_file() == (base / f).is_file(), f
    if (base / "tokenizer.model").is_file():
        assert (merged / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()
    eots = _end_of_turn_ids(name, base)
    eos = GenerationConfig.from_pretrained(merged).eos_token_id
    assert sorted(eos if isinstance(eos, list) else [eos]) == sorted(eots)
    tok = AutoTokenizer.from_pretrained(merged)
    text = "Grüße, 你好 🙂  two spaces " + tok.convert_ids_to_tokens(eots[0]) + " done"
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        plain_logits = plain(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(plain, run / "adapter")(input_ids=ids).logits
        got_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
        got = got_model(input_ids=ids).logits
    assert float((tuned - plain_logits).abs().max()) > 1e-3  # the adapter changes the outputs
    assert float((tuned - got).abs().max()) < 1e-3
    tied = got_model.get_input_embeddings().weight.data_ptr() == got_model.get_output_embeddings().weight.data_ptr()
    assert tied is family(name).tied
