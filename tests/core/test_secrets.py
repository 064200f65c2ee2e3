"""Secrets given in config or environment appear in no file under logs/ or outputs/."""

from __future__ import annotations

import logging
from pathlib import Path

from conftest import run_cli
from ftpipe.config import load_config
from ftpipe.core.logs import console_stream
from ftpipe.core.runs import Project, new_run
from ftpipe.core.stage import StageContext, StageResult, execute

CONFIG_TOKEN = "hf_configSECRET_1234567890"
ENV_TOKEN = "hf_envSECRET_0987654321"
API_KEY = "sk-serveKEY-abcdef123456"
LS_TOKEN = "ls-refresh-token-xyz-42424242"


def test_secrets_never_written(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        "model:\n  path: m\n"
        f"secrets:\n  hf_token: {CONFIG_TOKEN}\n"
        f"serve:\n  api_key: {API_KEY}\n"
        f"data:\n  label_studio:\n    token: {LS_TOKEN}\n",
        encoding="utf-8",
    )
    loaded = load_config(cfg, environ={"HF_TOKEN": ENV_TOKEN})
    run = new_run(Project.from_config(loaded), "r1")

    def careless(ctx: StageContext, plan: None) -> StageResult:
        # A library that logs too much: the config object, the raw secret values, the env token.
        log = logging.getLogger("ftpipe.careless")
        log.info("config: %r", ctx.config)
        log.info("token %s key %s env %s", ctx.config.secrets.hf_token.get_secret_value(),
                 ctx.config.serve.api_key.get_secret_value(), ENV_TOKEN)
        logging.getLogger("transformers.foo").warning("auth header Bearer %s", API_KEY)
        console_stream.write(f"console sees {LS_TOKEN}\n")
        out = ctx.run.path / "out.txt"
        out.write_text("fine", encoding="utf-8")
        return StageResult(outputs=[out], metrics={"note": "ok"})

    execute(StageContext.for_run("careless", loaded, run), lambda ctx: None, careless, sections=("serve",), inputs={})
    files = [p for folder in ("logs", "outputs") for p in (tmp_path / folder).rglob("*") if p.is_file()]
    assert any(p.name == "run.log" for p in files) and any(p.name == "manifest.json" for p in files)
    run_log = (run.log_dir("careless") / "run.log").read_text()
    assert "token *** key *** env ***" in run_log  # the lines were written, redacted
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        for secret in (CONFIG_TOKEN, ENV_TOKEN, API_KEY, LS_TOKEN):
            assert secret not in text, f"{secret} leaked into {path}"


def test_print_runtime_does_not_show_secrets(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"model:\n  path: m\nserve:\n  api_key: {API_KEY}\n", encoding="utf-8")
    result = run_cli("print-runtime", "--config", str(cfg), "--format", "json", env={"HF_TOKEN": ENV_TOKEN})
    assert result.code == 0, result.output
    assert API_KEY not in result.output and ENV_TOKEN not in result.output
