"""convert-awq: pre-flight errors (fast) and a real AWQ run on the CPU in the awq environment (slow).

The run fixture is a project folder with a tiny merged model (a tiny model copied to
outputs/<run>/merged under an export-merged manifest written by `record_stage`) and the demo data
prepared by preprocess-sft. The CLI runs in the train venv and delegates to the
checkout's `.venv-awq` (the executor's fallback for a project folder without its own venvs).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

import tests.project_factory as factory
from tests.conftest import REPO, run_cli

AWQ_VENV = REPO / ".venv-awq"
AWQ_PYTHON = AWQ_VENV / "bin" / "python"
RUN = "r1"

# A tiny shape whose 4-bit size is <= 0.35x of its fp16 size. Embeddings stay 16-bit (they are not
# quantized), so the Linear layers must dominate: with the conftest tiny model (vocab 2048,
# hidden 128, MLP 256, 4 layers) the honest ratio is 0.49; a vocabulary of 1024 and an MLP of 768
# give ~0.33.
AWQ_SHAPE = dict(arch="llama", hidden_size=128, intermediate_size=768, num_layers=4, vocab_size=1024,
                 tie_word_embeddings=True)
# Small calibration keeps the run near a minute on 2 shared cores.
AWQ_SETTINGS = (
    "awq:\n  calibration_samples: 16\n  calibration_max_length: 96\n  n_grid: 5\n"
    "  eval_rows: 32\n  verify_prompts: 4\n"
)


def make_project(root: Path, model_dir: Path, *, merged: bool = True) -> Path:
    """A project with the demo data prepared by preprocess-sft, run r1 and (optionally) a completed
    export-merged (the model copied in under `record_stage`); returns its config.yaml."""
    from stage_record import record_stage

    from ftpipe.config import load_config
    from ftpipe.core.runs import Project, new_run
    from ftpipe.core.stage import StageResult

    factory.make_project(root, model_dir, AWQ_SETTINGS, prepared=True)
    config = root / "config.yaml"
    loaded = load_config(config)
    run = new_run(Project.from_config(loaded), RUN)
    if merged:
        def body(ctx):
            shutil.copytree(model_dir, run.merged)
            return StageResult(outputs=[run.merged])

        record_stage("export-merged", loaded, run, body)
    return config


@pytest.fixture(scope="module")
def awq_model_dir(tmp_path_factory) -> Path:
    """The AWQ_SHAPE tiny model (random init)."""
    from ftpipe.core.config import TinyModelConfig
    from ftpipe.training.tiny_model import build

    out = tmp_path_factory.mktemp("tiny-awq")
    build(out, TinyModelConfig(**AWQ_SHAPE), [REPO / "data/demo/sentiment.jsonl"])
    return out


# ---------------------------------------------------------------- pre-flight (no quantization)

def test_awq_env_is_installed() -> None:
    # Everything slow below runs there; a missing env must fail loudly, not skip.
    assert AWQ_PYTHON.exists(), "run: bash scripts/bootstrap.sh awq"


def _refused(config: Path, cwd: Path, env: dict | None = None) -> str:
    """`ftpipe convert-awq` on the project's run: must exit 2; its stderr, stripped."""
    res = run_cli("convert-awq", "--config", str(config), "--run", RUN, cwd=cwd, env=env)
    assert res.code == 2, res.output
    return res.stderr.strip()


def test_missing_merged_model(tmp_path, tiny_model_dir) -> None:
    config = make_project(tmp_path, tiny_model_dir, merged=False)
    assert _refused(config, tmp_path) == (
        "error: run r1: no merged model (stage export-merged is missing: "
        "logs/r1/export-merged/manifest.json) (next: ftpipe export-merged --run r1)"
    )


def test_merged_folder_deleted_after_export(tmp_path, tiny_model_dir) -> None:
    config = make_project(tmp_path, tiny_model_dir)
    shutil.rmtree(tmp_path / "outputs" / RUN / "merged")
    assert _refused(config, tmp_path) == (
        "error: run r1: merged model missing (outputs/r1/merged/config.json not found) "
        "(next: ftpipe export-merged --run r1 --force)"
    )


def test_sizes_not_multiple_of_group_size(tmp_path, tiny_model_dir) -> None:
    config = make_project(tmp_path, tiny_model_dir)
    cfg_path = tmp_path / "outputs" / RUN / "merged" / "config.json"
    data = json.loads(cfg_path.read_text())
    data.update(hidden_size=192, intermediate_size=320)  # head_dim stays 32: o_proj input 4*32 = 128
    cfg_path.write_text(json.dumps(data))
    assert _refused(config, tmp_path) == (
        "error: outputs/r1/merged/config.json: hidden_size = 192 is not a multiple of awq.group_size = 128, "
        "intermediate_size = 320 is not a multiple of awq.group_size = 128 "
        "(AWQ groups need whole multiples) (next: quantize a model whose sizes are multiples of the group "
        "size, or set --set awq.group_size=N to a divisor)"
    )


def test_awq_env_not_installed(tmp_path, tiny_model_dir) -> None:
    config = make_project(tmp_path, tiny_model_dir)
    no_venvs = {"FTPIPE_VENV_ROOT": str(tmp_path / "no-venvs")}  # the executor looks only there
    assert _refused(config, tmp_path, env=no_venvs) == (
        "error: environment 'awq' is not installed (.venv-awq/ missing) (next: bash scripts/bootstrap.sh awq)"
    )


def test_all_problems_reported_at_once(tmp_path, tiny_model_dir) -> None:
    config = make_project(tmp_path, tiny_model_dir, merged=False)
    (tmp_path / "prepared/sentiment/val.jsonl").unlink()
    res = run_cli("convert-awq", "--config", str(config), "--run", RUN, cwd=tmp_path,
                  env={"FTPIPE_VENV_ROOT": str(tmp_path / "no-venvs")})
    assert res.code == 2, res.output
    assert res.stderr.strip() == (
        "error: run r1: no merged model (stage export-merged is missing: logs/r1/export-merged/manifest.json); "
        "prepared dataset 'sentiment' incomplete (prepared/sentiment/val.jsonl not found); "
        "environment 'awq' is not installed (.venv-awq/ missing) "
        "(next: ftpipe export-merged --run r1; ftpipe preprocess-sft; bash scripts/bootstrap.sh awq)"
    )


# ---------------------------------------------------------------- real AWQ on the CPU

@pytest.fixture(scope="module")
def awq_run(tmp_path_factory, awq_model_dir):
    root = tmp_path_factory.mktemp("awq-project")
    config = make_project(root, awq_model_dir)
    res = run_cli("convert-awq", "--config", str(config), "--run", RUN, cwd=root)
    return root, config, res


@pytest.mark.slow
def test_convert_awq_writes_verified_model(awq_run) -> None:
    root, _, res = awq_run
    assert res.code == 0, res.output[-3000:]
    manifest = json.loads((root / "logs" / RUN / "convert-awq" / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert manifest["environment"]["stage_environment"] == "awq"
    assert manifest["environment"]["venv"] == ".venv-awq"
    assert manifest["versions"]["llmcompressor"] == "0.14.0.1"
    m = manifest["metrics"]
    assert m["scheme"] == "W4A16" and m["group_size"] == 128
    assert m["quant_method"] == "compressed-tensors"
    from ftpipe.export.convert_awq import quantize_dtype

    assert m["dtype"] == quantize_dtype("auto")[0]  # awq.dtype auto: bfloat16 with native bf16, else float32
    # The unquantized embeddings keep the dtype: 0.42x of fp16 measured in float32 on this shape.
    assert m["size_ratio_vs_fp16"] <= {"bfloat16": 0.35, "float32": 0.45}[m["dtype"]], m
    assert m["awq_bytes"] / m["merged_fp16_bytes"] == pytest.approx(m["size_ratio_vs_fp16"], abs=1e-4)
    assert m["perplexity_increase"] <= m["max_perplexity_increase"] == 0.10
    assert m["awq_perplexity"] == pytest.approx(m["merged_perplexity"] * (1 + m["perplexity_increase"]), rel=1e-3)
    assert 0.0 <= m["greedy_token_agreement"] <= 1.0 and m["calibration_rows"] == 16

    awq = root / "outputs" / RUN / "awq"
    names = {p.name for p in awq.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "generation_config.json"} <= names
    merged = root / "outputs" / RUN / "merged"
    assert (awq / "chat_template.jinja").read_text() == (merged / "chat_template.jinja").read_text()
    qc = json.loads((awq / "config.json").read_text())["quantization_config"]
    weights = qc["config_groups"]["group_0"]["weights"]
    assert (qc["quant_method"], qc["format"], qc["ignore"]) == ("compressed-tensors", "pack-quantized", ["lm_head"])
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (4, 128, True)
    recorded = {r["path"] for r in manifest["outputs"]}
    assert f"outputs/{RUN}/awq/model.safetensors" in recorded
    assert not [p for p in (root / "outputs" / RUN).iterdir() if p.name.startswith(".awq")]  # no temp left


RELOAD = r"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path)
ids = tok.apply_chat_template([{"role": "user", "content": "The kettle was broken."}],
                              add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = model.generate(**ids, do_sample=False, max_new_tokens=4, pad_token_id=tok.pad_token_id)
print(type(model).__name__, model.config.quantization_config.quant_method.value, out.shape[1] > ids["input_ids"].shape[1])
"""


@pytest.mark.slow
def test_awq_output_reloads_with_transformers(awq_run) -> None:
    # compressed-tensors lives in the awq env (it pins its own transformers), so reload there.
    root, _, res = awq_run
    assert res.code == 0, res.output[-3000:]
    proc = subprocess.run(
        [str(AWQ_PYTHON), "-c", RELOAD, str(root / "outputs" / RUN / "awq")],
        capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "LlamaForCausalLM compressed-tensors True"


@pytest.mark.slow
def test_second_run_is_skipped(awq_run) -> None:
    root, config, res = awq_run
    assert res.code == 0, res.output[-3000:]
    again = run_cli("convert-awq", "--config", str(config), "--run", RUN, cwd=root)
    assert again.code == 0, again.output[-3000:]
    assert "convert-awq: up to date, skipped (use --force to rerun)" in again.stdout


DAMAGING_QUANTIZE = r"""
import sys
from pathlib import Path
import torch
import ftpipe.export.convert_awq as awq
from ftpipe.config import load_config
from ftpipe.core.errors import FtpipeError
from ftpipe.stages import run_stage

def damaging_quantize(model, tokenizer, calibration, cfg):
    # Stands in for AWQ: logits 20x sharper, so val perplexity must rise. The direction of real
    # 4-bit noise on a random-init tiny model is a coin flip (measured: -0.3% .. +0.2%).
    with torch.no_grad():
        model.model.norm.weight.mul_(20.0)

awq.quantize = damaging_quantize
try:
    run_stage("convert-awq", load_config(Path(sys.argv[1])), "r1")
except FtpipeError as exc:
    print(type(exc).__name__, exc.one_line())
    sys.exit(exc.exit_code)
"""


@pytest.mark.slow
def test_perplexity_bound_fails_the_stage(tmp_path, tiny_model_dir) -> None:
    # The stage (in the awq env, in-process) with its quantizer replaced by a damaging one: a
    # StageError naming the bound, the manifest says failed, no awq/ folder nor temp folder left.
    config = make_project(tmp_path, tiny_model_dir)
    proc = subprocess.run(
        [str(AWQ_PYTHON), "-c", DAMAGING_QUANTIZE, str(config)], cwd=tmp_path, capture_output=True, text=True,
        timeout=600, env={"HF_HUB_OFFLINE": "1", "FTPIPE_ENV": "awq", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("StageError AWQ raised val perplexity "), line
    assert line.endswith(
        "over awq.max_perplexity_increase = 0.1 (next: more calibration rows "
        "(--set awq.calibration_samples=N), W4A16_ASYM, or a larger bound)"
    ), line
    manifest = json.loads((tmp_path / "logs" / RUN / "convert-awq" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["error"].startswith("AWQ raised val perplexity")
    assert sorted(p.name for p in (tmp_path / "outputs" / RUN).iterdir()) == ["merged"]


@pytest.mark.parametrize(("configured", "cuda", "flags", "expected"), [
    ("auto", False, {"avx2", "avx512f", "amx_bf16"}, "bfloat16"),   # native bf16 (AMX)
    ("auto", False, {"avx2", "avx512f", "avx512_bf16"}, "bfloat16"),
    ("auto", False, {"avx2", "avx512f"}, "float32"),                # emulated bf16: float32
    ("auto", False, {"avx2"}, "float32"),
    ("auto", True, {"avx2"}, "bfloat16"),                           # a GPU
    ("bfloat16", False, {"avx2"}, "bfloat16"),                      # what the user set, kept
    ("float32", False, {"amx_bf16"}, "float32"),
])
def test_awq_dtype_auto_follows_the_machine(monkeypatch, configured, cuda, flags, expected) -> None:
    import torch

    from ftpipe.core import runtime_info
    from ftpipe.export import convert_awq

    monkeypatch.setattr(runtime_info, "cpu_flags", lambda: set(flags))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    dtype, why = convert_awq.quantize_dtype(configured)
    assert dtype == expected
    assert why == "awq.dtype" if configured != "auto" else why != "awq.dtype"


def test_dockerfile_awq_runner_is_multistage_without_source_copy() -> None:
    text = (REPO / "Dockerfile.awq-runner").read_text(encoding="utf-8")
    instructions = [line.split()[0] for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert instructions.count("FROM") == 2  # build stage + runtime stage
    assert "COPY --from=build /opt/venv /opt/venv" in text
    copies = [line for line in text.splitlines() if line.startswith("COPY")]
    assert copies == ["COPY requirements/cuda/awq.lock /tmp/awq.lock", "COPY --from=build /opt/venv /opt/venv"]
    assert "pip install -r /tmp/awq.lock" in text and "PYTHONPATH=/workspace/src" in text
    lock = (REPO / "requirements/awq.lock").read_text(encoding="utf-8").splitlines()
    assert "torch==2.13.0+cpu" in lock and "llmcompressor==0.14.0.1" in lock
    assert not [line for line in lock if line.startswith(("nvidia-cu", "triton"))]  # CPU-only lock
    # The image's lock: the same, with torch's CUDA build (tests/serve/test_dockerfiles.py compares them).
    cuda = (REPO / "requirements/cuda/awq.lock").read_text(encoding="utf-8").splitlines()
    assert "torch==2.13.0" in cuda and "llmcompressor==0.14.0.1" in cuda
