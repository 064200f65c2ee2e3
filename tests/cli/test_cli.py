"""CLI tier: help is instant (no torch import), print-runtime, make-tiny-model, error handling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import REPO, run_cli
from ftpipe.cli.main import app

DESIGN_COMMANDS = [
    "import-gguf", "preprocess-sft", "preprocess-dpo", "finetune-sft", "finetune-dpo", "export-merged", "convert-awq", "eval-sft", "export-gguf",
    "ollama-load", "serve", "smoke-test", "run", "demo", "report", "tensorboard", "runs",
    "print-runtime", "make-tiny-model", "check-template",
]

HELP_PROBE = r"""
import sys
from typer.testing import CliRunner
from ftpipe.cli.main import app
import typer.main
runner = CliRunner()
names = sorted(typer.main.get_command(app).commands)
res = runner.invoke(app, ["--help"])
assert res.exit_code == 0, res.output
for name in names:
    res = runner.invoke(app, [name, "--help"])
    assert res.exit_code == 0, (name, res.output)
heavy = sorted(m for m in ("torch", "transformers", "trl", "peft", "vllm", "llmcompressor", "datasets") if m in sys.modules)
print(",".join(names)); print("heavy=" + ",".join(heavy))
"""


def test_help_lists_commands_without_heavy_imports() -> None:
    proc = subprocess.run([sys.executable, "-c", HELP_PROBE], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    names_line, heavy_line = proc.stdout.strip().splitlines()[-2:]
    assert heavy_line == "heavy="
    names = set(names_line.split(","))
    assert {"make-tiny-model", "print-runtime", "runs"} <= names
    assert names <= set(DESIGN_COMMANDS), names - set(DESIGN_COMMANDS)


def test_print_runtime_json_names_every_environment() -> None:
    result = run_cli("print-runtime", "--config", "debug_config.yaml", "--format", "json")
    assert result.code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report["environments"]) == {"train", "awq", "serve", "gguf"}
    train = report["environments"]["train"]
    assert train["installed"] and train["venv"] == ".venv" and train["service"] == "sft"
    assert train["versions"]["transformers"].startswith("5.") and "torch" in train["versions"]
    for env in report["environments"].values():
        assert env["installed"] == bool(env["versions"])
    assert train["state"] == "ready"  # test.sh built it from requirements/train.lock just now
    assert report["prepared_dir"] == "prepared/sentiment"
    assert isinstance(report["devices"]["cpu_bf16"], bool)
    assert set(report["docker"]) == {"client", "engine", "compose"}


def test_environment_state_follows_bootstrap_markers(tmp_path: Path, monkeypatch) -> None:
    import hashlib

    from ftpipe.core.executor import ENVIRONMENTS
    from ftpipe.core.runtime_info import environment_state

    monkeypatch.setenv("FTPIPE_VENV_ROOT", str(tmp_path))
    env = ENVIRONMENTS["awq"]
    assert environment_state(tmp_path, env) == "missing (bash scripts/bootstrap.sh awq)"
    folder = tmp_path / ".venv-awq"
    folder.mkdir()
    assert environment_state(tmp_path, env).startswith("unmanaged (")
    (folder / ".ftpipe-building").write_text(str(os.getpid()))
    assert environment_state(tmp_path, env) == f"building (bootstrap.sh, pid {os.getpid()})"
    dead = subprocess.Popen(["true"])
    dead.wait()
    (folder / ".ftpipe-building").write_text(str(dead.pid))
    assert environment_state(tmp_path, env) == "incomplete (a build stopped midway: bash scripts/bootstrap.sh awq)"
    (folder / ".ftpipe-building").unlink()
    (folder / ".ftpipe-lock").write_text("0" * 64 + "\n")
    assert environment_state(tmp_path, env) == "stale (requirements/awq.lock changed: bash scripts/bootstrap.sh awq)"
    # The digest bootstrap.sh writes: sha256 of the lock file followed by its post-install script.
    post = REPO / "scripts/post-install-awq.sh"
    data = (REPO / "requirements/awq.lock").read_bytes() + (post.read_bytes() if post.is_file() else b"")
    (folder / ".ftpipe-lock").write_text(hashlib.sha256(data).hexdigest() + "\n")
    assert environment_state(tmp_path, env) == "ready"


def test_print_runtime_for_a_run(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("model:\n  path: m\nserve:\n  artifact: awq\n")
    (tmp_path / "outputs/r7").mkdir(parents=True)
    (tmp_path / "outputs/latest.txt").write_text("r7\n")
    result = run_cli("print-runtime", "--config", str(tmp_path / "config.yaml"), "--format", "json")
    assert result.code == 0, result.output
    run = json.loads(result.stdout)["run"]
    assert run["name"] == "r7" and run["merged"] == "outputs/r7/merged"
    assert run["served_model_path"] == "outputs/r7/awq"


def test_make_tiny_model_loads_and_masks(tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    result = run_cli("make-tiny-model", "--out", str(out), "--vocab-size", "1024", "--num-layers", "2")
    assert result.code == 0, result.output
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size % 128 == 0
    assert model.config.tie_word_embeddings
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello there"}]
    enc = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    mask = enc["assistant_masks"]
    assistant_ids = [i for i, m in zip(enc["input_ids"], mask) if m]
    assert tok.decode(assistant_ids) == "Hello there<|im_end|>"
    assert tok.eos_token == "<|im_end|>"


def test_make_tiny_model_rejects_awq_unfriendly_sizes(tmp_path: Path) -> None:
    result = run_cli("make-tiny-model", "--out", str(tmp_path / "t"), "--hidden-size", "100")
    assert result.code == 2
    assert result.stderr.strip() == "error: model.tiny.hidden_size = 100 is not a multiple of 128 (AWQ group size)"


def test_debug_env_shows_traceback() -> None:
    result = run_cli("print-runtime", "--config", "debug_config.yaml", "--run", "../x", env={"FTPIPE_DEBUG": "1"})
    assert result.code != 0 and "Traceback" in result.stderr


def test_runs_list_and_show(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("model:\n  path: m\n")
    empty = run_cli("runs", "list", "--config", str(tmp_path / "config.yaml"))
    assert empty.code == 0 and "no runs yet" in empty.stdout
    stage_dir = tmp_path / "logs/r1/finetune-sft"
    stage_dir.mkdir(parents=True)
    (tmp_path / "outputs/r1").mkdir(parents=True)
    (tmp_path / "outputs/latest.txt").write_text("r1\n")
    (stage_dir / "manifest.json").write_text(json.dumps({"status": "completed", "metrics": {"train_loss": 1.25}, "finished_at": "t"}))
    listed = run_cli("runs", "list", "--config", str(tmp_path / "config.yaml"))
    assert listed.code == 0 and "r1 (latest)" in listed.stdout and "finetune-sft:completed" in listed.stdout
    shown = run_cli("runs", "show", "r1", "--config", str(tmp_path / "config.yaml"))
    assert shown.code == 0 and "train_loss=1.25" in shown.stdout


@pytest.mark.parametrize("config, argv, expected", [
    ("debug_config.yaml", [], "demo"),                                # the tiny demo's run
    ("configs/demo-smollm2.yaml", [], "smollm2-demo"),                # the config's run.name
    ("configs/demo-smollm2.yaml", ["--run", "mine"], "mine"),         # --run wins
])
def test_demo_names_its_run_after_the_config(config: str, argv: list[str], expected: str, monkeypatch) -> None:
    """`ftpipe demo` takes run.name from its config before its own default, so the real-model demo
    (configs/demo-smollm2.yaml) never reuses the tiny demo's run folder."""
    import ftpipe.pipeline

    seen = []

    def stop_here(loaded, run_name, start, stop):
        seen.append(run_name)
        raise SystemExit(3)

    monkeypatch.setattr(ftpipe.pipeline, "open_pipeline_run", stop_here)
    monkeypatch.chdir(REPO)
    result = CliRunner().invoke(app, ["demo", "--config", config, *argv])
    assert result.exit_code == 3 and seen == [expected], result.output
