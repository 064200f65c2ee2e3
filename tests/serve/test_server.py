"""serve without a running model: server commands per artifact, where the key goes, pre-flight errors."""

from __future__ import annotations

import json
import logging
import socket

import pytest
from conftest import run_cli

from stage_record import record_stage

from ftpipe.config import load_config
from ftpipe.core.errors import InputError
from ftpipe.core.runs import Project, RunDir
from ftpipe.core.stage import StageResult
from ftpipe.serve.serve import check_port_free, llama_cpp_command, server_environment, vllm_command, vllm_downcast
from ftpipe.serve.served import resolve_artifact
from ftpipe.stages import producers
from serve.helpers import fabricate_merged, free_port, write_project

KEY = "sk-unit-93b1c0ffee"


def _fabricate(project_dir, run_name: str, stage: str, fill) -> RunDir:
    from ftpipe.core.runs import new_run

    loaded = load_config(project_dir / "config.yaml", environ={})
    run = new_run(Project.from_config(loaded), run_name)

    def body(ctx):
        return StageResult(outputs=fill(run))

    record_stage(stage, loaded, run, body)
    return run


@pytest.fixture
def project(tmp_path, tiny_model_dir):
    config = write_project(tmp_path, tiny_model_dir, free_port())
    return tmp_path, config


def _loaded(config, *sets, environ=None):
    return load_config(config, list(sets), environ=environ or {})


def test_merged_command_names_the_run_and_keeps_the_key_off_argv(project, tiny_model_dir):
    root, config = project
    fabricate_merged(root, "r1", tiny_model_dir)
    loaded = _loaded(config, f"serve.api_key={KEY}", "serve.max_num_seqs=8", "serve.extra_args=[--enforce-eager]")
    run = RunDir(Project.from_config(loaded), "r1")
    served = resolve_artifact(run, "merged", producers=producers())
    cfg = loaded.config.serve
    argv = vllm_command("python", served, cfg)
    assert argv == [
        "python", "-m", "vllm.entrypoints.openai.api_server", "--model", str(run.merged),
        "--host", "127.0.0.1", "--port", str(cfg.port), "--max-model-len", "256", "--dtype", "auto",
        "--served-model-name", "r1", "--max-num-seqs", "8", "--enforce-eager",
    ]
    env = server_environment(served, cfg, base={"PATH": "/bin", "API_KEY": "inherited", "VLLM_API_KEY": "inherited"})
    assert env == {"PATH": "/bin", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_API_KEY": KEY}
    # No key configured: an inherited VLLM_API_KEY must not switch authentication on silently.
    plain = _loaded(config).config.serve
    assert "VLLM_API_KEY" not in server_environment(served, plain, base={"VLLM_API_KEY": "inherited"})


@pytest.mark.parametrize(("saved", "dtype", "told"), [
    ("float32", "auto", True),      # vLLM would downcast what eval-sft measured in fp32
    ("float32", "float32", False),  # served as evaluated
    ("bfloat16", "auto", False),    # auto keeps bf16
])
def test_a_float32_artifact_served_with_dtype_auto_is_named_as_downcast(project, tiny_model_dir, saved, dtype, told):
    root, config = project
    fabricate_merged(root, "r1", tiny_model_dir)
    loaded = _loaded(config, f"serve.dtype={dtype}")
    run = RunDir(Project.from_config(loaded), "r1")
    model_config = json.loads((run.merged / "config.json").read_text())
    model_config.pop("torch_dtype", None)
    (run.merged / "config.json").write_text(json.dumps({**model_config, "dtype": saved}))
    note = vllm_downcast(resolve_artifact(run, "merged", producers=producers()), loaded.config.serve)
    assert (note is not None) == told
    if told:
        assert "bfloat16" in note and "serve.dtype: float32" in note


def test_adapter_is_served_as_a_lora_on_its_base(project, tiny_model_dir):
    root, config = project

    def fill(run):
        run.adapter.mkdir(parents=True)
        (run.adapter / "adapter_config.json").write_text(json.dumps({"r": 32, "lora_alpha": 64}))
        (run.adapter / "ftpipe_base_model.json").write_text(json.dumps({"id": None, "revision": None, "path": str(tiny_model_dir)}))
        return [run.adapter]

    run = _fabricate(root, "r2", "finetune-sft", fill)
    served = resolve_artifact(run, "adapter", producers=producers())
    assert served.model == str(tiny_model_dir) and served.tokenizer_dir == run.adapter
    argv = vllm_command("python", served, _loaded(config).config.serve)
    assert argv[argv.index("--served-model-name") + 1] == "r2-base"
    assert argv[argv.index("--lora-modules") + 1] == f"r2={run.adapter}"
    assert argv[argv.index("--max-lora-rank") + 1] == "32" and "--enable-lora" in argv


def test_gguf_is_served_by_llama_cpp_with_the_key_in_its_environment(project, caplog):
    root, config = project

    def fill(run):
        run.gguf.mkdir(parents=True)
        for kind in ("f16", "q8_0"):
            (run.gguf / f"model-{kind}.gguf").write_bytes(b"GGUF")
        return [run.gguf]

    run = _fabricate(root, "r3", "export-gguf", fill)
    loaded = _loaded(config, f"serve.api_key={KEY}")
    served = resolve_artifact(run, "gguf", "q8_0", producers=producers())
    assert served.kind == "llama.cpp" and served.model == str(run.gguf / "model-q8_0.gguf")
    argv = llama_cpp_command("/venv-gguf/python", served, loaded.config.serve)
    assert argv == ["/venv-gguf/python", "-m", "llama_cpp.server", "--model", served.model, "--model_alias", "r3",
                    "--host", "127.0.0.1", "--port", str(loaded.config.serve.port), "--n_ctx", "256"]
    assert server_environment(served, loaded.config.serve, base={})["API_KEY"] == KEY
    # vLLM's extra arguments stay off llama.cpp's command line (its parser would stop at them); its own go on.
    both = _loaded(config, "serve.extra_args=[--enforce-eager]", "serve.llama_cpp_args=[--n_threads,'2']")
    with caplog.at_level(logging.WARNING, logger="ftpipe.serve.serve"):
        argv = llama_cpp_command("/venv-gguf/python", served, both.config.serve)
    assert argv[-3:] == ["256", "--n_threads", "2"] and "--enforce-eager" not in argv
    assert "serve.extra_args ['--enforce-eager'] are vLLM's: not passed to llama.cpp's server" in caplog.text
    with pytest.raises(InputError, match=r"expected one q4_k_m GGUF among the export-gguf outputs, found: model-f16.gguf, model-q8_0.gguf"):
        resolve_artifact(run, "gguf", "q4_k_m", producers=producers())


@pytest.mark.parametrize("run, flags, message", [
    ("r4", ["--artifact", "awq"], "error: run r4: stage convert-awq is missing (logs/r4/convert-awq/manifest.json) "
                                  "(next: ftpipe convert-awq --run r4)"),
    ("r5", ["--host", "0.0.0.0"], "error: serve.host 0.0.0.0 is not a loopback address: set serve.api_key so strangers "
                                  "cannot use the server (next: --api-key KEY (or FTPIPE_API_KEY / "
                                  "FTPIPE__SERVE__API_KEY in the environment))"),
], ids=["missing-artifact-names-the-command", "off-loopback-bind-requires-a-key"])
def test_serve_refused_before_launching(project, tiny_model_dir, run, flags, message):
    root, config = project
    fabricate_merged(root, run, tiny_model_dir)
    result = run_cli("serve", "--config", str(config), "--run", run, *flags)
    assert result.code == 2, result.output
    assert message in result.stderr


def test_busy_port_is_refused_before_launching(project, tiny_model_dir):
    root, config = project
    fabricate_merged(root, "r6", tiny_model_dir)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(InputError, match=f"cannot bind 127.0.0.1:{port}: Address already in use"):
            check_port_free("127.0.0.1", port)
        result = run_cli("serve", "--config", str(config), "--run", "r6", "--port", str(port))
    assert result.code == 2, result.output
    assert f"error: cannot bind 127.0.0.1:{port}: Address already in use" in result.stderr
    assert not (root / "logs/r6/serve/server.log").exists()  # nothing was launched


def test_stop_without_a_server(project, tiny_model_dir):
    root, config = project
    fabricate_merged(root, "r7", tiny_model_dir)
    result = run_cli("serve", "stop", "--config", str(config), "--run", "r7")
    assert result.code == 2, result.output
    assert ("error: run r7: no running server (logs/r7/serve/server.json missing or stale) "
            "(next: ftpipe serve --run r7 --detach)") in result.stderr
    # A stale pid file (process gone) is detected and removed.
    state = root / "logs/r7/serve/server.json"
    state.write_text(json.dumps({"pid": 999999, "run": "r7", "artifact": "merged", "kind": "vllm", "model_name": "r7",
                                 "host": "127.0.0.1", "port": 1, "url": "http://127.0.0.1:1/v1", "started_at": "x",
                                 "detached": True, "log": "x", "extra": {}}))
    result = run_cli("serve", "stop", "--config", str(config), "--run", "r7")
    assert result.code == 2 and "no running server" in result.stderr
    assert not state.exists()


def test_smoke_test_without_a_server(project, tiny_model_dir):
    root, config = project
    fabricate_merged(root, "r8", tiny_model_dir)
    port = free_port()
    result = run_cli("smoke-test", "--config", str(config), "--run", "r8", "--port", str(port))
    assert result.code == 2, result.output
    assert (f"error: no server answers at http://127.0.0.1:{port}/v1 "
            "(next: ftpipe serve --run r8 --artifact merged --detach)") in result.stderr
    manifest = json.loads((root / "logs/r8/smoke-test/manifest.json").read_text())
    assert manifest["status"] == "failed"
