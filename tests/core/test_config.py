"""Config tier: every shipped YAML validates; bad keys and values fail naming key and origin."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO, run_cli
from ftpipe.config import load_config
from ftpipe.core.errors import ConfigError

SHIPPED = sorted([REPO / "config.yaml", REPO / "debug_config.yaml", *(REPO / "configs").glob("*.yaml")])


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path) -> None:
    loaded = load_config(path, environ={})
    # The project root is the repository's (configs/ files say `paths.root: ..`), so the data they name is there.
    assert loaded.root == REPO.resolve()
    assert loaded.config.model.id or loaded.config.model.path
    source = loaded.config.data.source
    assert source is None or (loaded.root / source).is_file() or "://" in source, source


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_unknown_key_names_file_line_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  path: m\nfinetune:\n  lora_r: 8\n  learning_rat: 0.1\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path, environ={})
    assert exc.value.message == f"{path}:5: finetune.learning_rat: unknown key"


def test_bad_value_names_key_and_value(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  path: m\nfinetune:\n  lora_r: -3\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path, environ={})
    assert exc.value.message == f"{path}:4: finetune.lora_r: Input should be greater than 0 (got -3)"


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  path: m\nfinetune:\n  lora_r: x\n  nope: 1\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path, environ={})
    assert "finetune.lora_r" in exc.value.message and "finetune.nope: unknown key" in exc.value.message


def test_missing_model_source(tmp_path: Path) -> None:
    path = write(tmp_path, "data:\n  name: x\n")
    with pytest.raises(ConfigError, match="model: required key is missing"):
        load_config(path, environ={})


def test_precedence_defaults_yaml_env_set_flags(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  path: m\nfinetune:\n  lora_r: 4\n  lora_alpha: 8\n  seed: 1\n")
    assert load_config(path, environ={}).config.finetune.lora_r == 4
    env = {"FTPIPE__FINETUNE__LORA_R": "5", "FTPIPE__FINETUNE__LORA_ALPHA": "9"}
    loaded = load_config(path, ["finetune.lora_alpha=10", "finetune.seed=2"], environ=env)
    assert (loaded.config.finetune.lora_r, loaded.config.finetune.lora_alpha, loaded.config.finetune.seed) == (5, 10, 2)
    loaded = load_config(path, ["finetune.seed=2"], environ=env, flags={"finetune.seed": 3, "finetune.lora_r": None})
    assert (loaded.config.finetune.seed, loaded.config.finetune.lora_r) == (3, 5)
    assert loaded.config.finetune.max_length == 1024  # untouched default


def test_env_override_error_names_the_variable(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  path: m\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path, environ={"FTPIPE__FINETUNE__EPOCHS": "many"})
    assert exc.value.message.startswith("environment FTPIPE__FINETUNE__EPOCHS: finetune.epochs:")


def test_invalid_yaml_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  path: m\n finetune: [\n")
    with pytest.raises(ConfigError, match=rf"^{path}:\d+: invalid YAML"):
        load_config(path, environ={})


def test_top_level_must_be_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError, match="the top level must be a mapping"):
        load_config(path, environ={})


def test_config_hash_changes_only_with_its_sections(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  path: m\n")
    base = load_config(path, environ={})
    other_eval = load_config(path, ["eval.max_new_tokens=5"], environ={})
    other_train = load_config(path, ["finetune.lora_r=4"], environ={})
    assert base.section_hash("finetune") == other_eval.section_hash("finetune")
    assert base.section_hash("finetune") != other_train.section_hash("finetune")


def test_model_is_hashed_by_every_stage_but_the_one_that_writes_a_model(tmp_path: Path) -> None:
    """`ftpipe import-gguf --package P --name N` and a config naming the same import under another
    model.path are one import (the real-model demo after the README's import command)."""
    from ftpipe import stages

    path = write(tmp_path, "model:\n  path: m\nimport_gguf:\n  package: p==1\n  name: n\n")
    base, moved = load_config(path, environ={}), load_config(path, ["model.path=models/n"], environ={})
    importing = stages.get("import-gguf").sections
    assert "model" not in importing and base.section_hash(*importing) == moved.section_hash(*importing)
    assert base.section_hash(*importing) != load_config(path, ["import_gguf.name=o"], environ={}).section_hash(*importing)
    for stage in stages.STAGES:
        if stage.model_folder is None:
            assert stage.sections[0] == "model", stage.name
            assert base.section_hash(*stage.sections) != moved.section_hash(*stage.sections), stage.name


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--set", "finetune.lr=3"], "--set finetune.lr: finetune.lr: unknown key"),
        (["--set", "finetune"], "--set 'finetune': expected section.key=value"),
        (["--set", "model.path.x=1"], "--set model.path.x: model.path is not a section"),
    ],
)
def test_cli_bad_config_exit_2_one_line(args: list[str], expected: str) -> None:
    result = run_cli("print-runtime", "--config", "debug_config.yaml", *args)
    assert result.code == 2
    assert "Traceback" not in result.output
    assert result.stderr.strip().splitlines() == [f"error: {expected} (next: ftpipe --help)" if "expected section" in expected else f"error: {expected}"]


def test_cli_missing_config_file(tmp_path: Path) -> None:
    result = run_cli("print-runtime", "--config", str(tmp_path / "nope.yaml"))
    assert result.code == 2
    assert result.stderr.strip() == (
        f"error: {tmp_path / 'nope.yaml'}: config file not found (next: pass --config PATH (e.g. debug_config.yaml))"
    )
