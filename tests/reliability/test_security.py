"""Security: secrets never reach logs, manifests or outputs; outputs are safetensors only.

A real small pipeline (`ftpipe run --to export-merged`: preprocess-sft, finetune-sft,
export-merged on the tiny model) runs with a token in `secrets.hf_token`, a key in
`serve.api_key` and HF_TOKEN in the environment; then every file under logs/ and outputs/ is
grepped for them. Compose ports on 127.0.0.1: tests/serve/test_compose.py; serve on 127.0.0.1 and
refusing requests without the key: tests/serve/test_serve_vllm.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_cli

HF_SECRET = "hf_RELIABILITYsecret0123456789abcdef"
API_SECRET = "sk-reliability-api-key-0123456789"
ENV_SECRET = "hf_ENVIRONMENTsecret9876543210fedcba"


@pytest.mark.slow
def test_secrets_absent_from_every_log_manifest_and_output(project: Path):
    config = project / "config.yaml"
    config.write_text(
        config.read_text(encoding="utf-8")
        + f"secrets:\n  hf_token: {HF_SECRET}\nserve:\n  api_key: {API_SECRET}\n",
        encoding="utf-8",
    )
    result = run_cli("run", "--config", str(config), "--to", "export-merged",
                     "--set", "finetune.max_steps=2", "--set", "finetune.save_steps=2",
                     cwd=project, env={"HF_TOKEN": ENV_SECRET, "FTPIPE_ENV": "train"})
    assert result.code == 0, result.output
    for secret in (HF_SECRET, API_SECRET, ENV_SECRET):
        assert secret not in result.output
    files = [p for folder in ("logs", "outputs", "prepared") for p in (project / folder).rglob("*") if p.is_file()]
    assert any(p.name == "manifest.json" for p in files) and any(p.name == "run.log" for p in files)
    leaks = [str(p) for p in files for s in (HF_SECRET, API_SECRET, ENV_SECRET) if s.encode() in p.read_bytes()]
    assert leaks == []
    # safetensors only: no pickled weights anywhere among the outputs
    pickles = [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")
               and "trainer_state" not in p.parts]
    assert pickles == [], pickles
    assert (project / "outputs").rglob("*.safetensors")


def test_trust_remote_code_is_never_switched_on_in_code():
    """Every `from_pretrained` call in src/ either omits trust_remote_code (transformers' default:
    off) or passes it through from the config / a kwargs dict built from it - never a literal True."""
    import ast

    from tests.conftest import REPO

    calls, literal_true = 0, []
    for path in (REPO / "src/ftpipe").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "from_pretrained":
                calls += 1
                for kw in node.keywords:
                    if kw.arg == "trust_remote_code" and not (
                        isinstance(kw.value, ast.Attribute) and kw.value.attr == "trust_remote_code"
                        or isinstance(kw.value, ast.Name) and kw.value.id == "trust"
                    ):
                        literal_true.append(f"{path.name}:{node.lineno}")
        text = path.read_text(encoding="utf-8")
        assert "trust_remote_code=True" not in text and '"trust_remote_code": True' not in text, path
    assert calls >= 15
    assert literal_true == []
