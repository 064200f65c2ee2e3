"""Hostile configs: each gives one line, exit 2, no traceback - never a crash or a silent default."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_cli

CASES = [
    # (id, file content (bytes), expected stderr fragment after "error: ")
    ("empty-section-value", b"model:\n  path: m\nfinetune: 3\n", "finetune: Input should be a valid dictionary"),
    ("unknown-top-level", b"model:\n  path: m\nfinetuning:\n  lora_r: 8\n", ":3: finetuning: unknown key"),
    ("unknown-nested", b"model:\n  path: m\nfinetune:\n  lora:\n    r: 8\n", ":4: finetune.lora: unknown key"),
    ("wrong-type-int", b"model:\n  path: m\nfinetune:\n  batch_size: many\n", ":4: finetune.batch_size: Input should be a valid integer"),
    ("wrong-type-list", b"model:\n  path: m\ngguf:\n  outtypes: f16\n", ":4: gguf.outtypes: Input should be a valid list"),
    ("bad-literal", b"model:\n  path: m\nfinetune:\n  method: magic\n", ":4: finetune.method: Input should be 'lora', 'dora', 'qlora' or 'full'"),
    ("negative", b"model:\n  path: m\nfinetune:\n  learning_rate: -1\n", ":4: finetune.learning_rate: Input should be greater than 0"),
    ("fraction-out-of-range", b"model:\n  path: m\npreprocess:\n  val_fraction: 1.5\n", ":4: preprocess.val_fraction: Input should be less than 1"),
    ("port-out-of-range", b"model:\n  path: m\nserve:\n  port: 70000\n", ":4: serve.port: Input should be less than 65536"),
    ("no-model", b"data:\n  name: x\n", "model: required key is missing"),
    ("model-neither-id-nor-path", b"model:\n  revision: abc\n", "model: set model.id (hub id) or model.path (local folder)"),
    ("tiny-without-path", b"model:\n  id: x/y\n  tiny: {}\n", "model.tiny needs model.path"),
    ("top-level-list", b"- 1\n- 2\n", ":1: the top level must be a mapping of sections, got list"),
    ("top-level-scalar", b"hello\n", ":1: the top level must be a mapping of sections, got str"),
    ("broken-yaml", b"model:\n  path: [m\n", "invalid YAML"),
    ("tab-indent", b"model:\n\tpath: m\n", "invalid YAML"),
    ("binary", b"\x00\x01\x02\xff\xfe", "not a UTF-8 text file"),
    ("latin1", "model:\n  path: caf\u00e9\n".encode("latin-1"), "not a UTF-8 text file"),
    ("deep-nesting", b"model:\n  path: m\nfinetune:\n" + b"".join(b"  " * (i + 1) + f"k{i}:\n".encode() for i in range(60)) + b"  " * 61 + b"v: 1\n", ":4: finetune.k0: unknown key"),
    ("huge-line", b"model:\n  path: m\nfinetune:\n  target_modules: " + b"x" * 2_000_000 + b"\n", "finetune.target_modules"),
    ("null-section", b"model:\n  path: m\nfinetune: null\n", "finetune: Input should be a valid dictionary"),
    ("bool-as-int", b"model:\n  path: m\nfinetune:\n  lora_r: [1, 2]\n", ":4: finetune.lora_r: Input should be a valid integer"),
    ("secret-wrong-type", b"model:\n  path: m\nserve:\n  api_key: {a: 1}\n", ":4: serve.api_key: Input should be a valid string"),
    ("duplicate-path-traversal-run", b"model:\n  path: m\nrun:\n  name: 3\n", ":4: run.name: Input should be a valid string"),
]


@pytest.mark.parametrize("case_id, content, expected", CASES, ids=[c[0] for c in CASES])
def test_hostile_config(tmp_path: Path, case_id: str, content: bytes, expected: str) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_bytes(content)
    result = run_cli("runs", "list", "--config", str(cfg))
    assert result.code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--set", "finetune.max_steps=abc"], "--set finetune.max_steps: finetune.max_steps: Input should be a valid integer"),
        (["--set", "=3"], "--set : '' is not a dotted key"),
        (["--set", "a..b=1"], "is not a dotted key"),
        (["--run", "/etc"], "run name '/etc' is not allowed"),
        (["--run", "a/../../b"], "is not allowed"),
    ],
)
def test_hostile_overrides(args: list[str], expected: str) -> None:
    result = run_cli("print-runtime", "--config", "debug_config.yaml", *args)
    assert result.code == 2, result.output
    assert "Traceback" not in result.output
    assert expected in result.stderr.strip()


def test_config_symlink_loop(tmp_path: Path) -> None:
    loop = tmp_path / "config.yaml"
    loop.symlink_to(loop)
    result = run_cli("runs", "list", "--config", str(loop))
    assert result.code == 2 and "Traceback" not in result.output
    assert result.stderr.startswith(f"error: {loop}")


def test_config_is_a_directory(tmp_path: Path) -> None:
    result = run_cli("runs", "list", "--config", str(tmp_path))
    assert result.code == 2 and "Traceback" not in result.output
    assert result.stderr.startswith(f"error: {tmp_path}")
