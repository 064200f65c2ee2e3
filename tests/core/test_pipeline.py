"""Pipeline stage selection (the end-to-end runs are in tests/e2e/)."""

from __future__ import annotations

import pytest

from ftpipe.core.errors import ConfigError
from ftpipe.pipeline import ORDER, pipeline_order, select_stages


def test_order_and_slicing() -> None:
    configured = ["report", "finetune-sft", "preprocess-sft", "export-merged"]
    assert select_stages(configured, None, None) == ["preprocess-sft", "finetune-sft", "export-merged", "report"]
    assert select_stages(configured, "finetune-sft", None) == ["finetune-sft", "export-merged", "report"]
    assert select_stages(configured, None, "export-merged") == ["preprocess-sft", "finetune-sft", "export-merged"]
    assert select_stages(ORDER, "serve", "serve") == ["serve"]


def test_the_server_step_does_not_wait_for_the_gguf_it_does_not_serve() -> None:
    """Serving merged (the demo), awq or adapters needs nothing from export-gguf, whose environment is the
    last a first run builds: that step goes before it. Serving the GGUF keeps the table's order."""
    assert pipeline_order("gguf") == ORDER
    for artifact in ("merged", "awq", "adapter", "adapters"):
        order = pipeline_order(artifact)
        assert sorted(order) == sorted(ORDER)
        assert order.index("serve") == order.index("export-gguf") - 1 == ORDER.index("export-gguf")
        assert order[-1] == "report"
    chosen = select_stages(["eval-sft", "export-gguf", "serve", "report"], "serve", None, pipeline_order("merged"))
    assert chosen == ["serve", "export-gguf", "report"]


def test_eval_sft_follows_export_gguf_when_it_evaluates_the_gguf() -> None:
    """eval-sft's gguf_* artifacts are export-gguf's files: asked for, eval-sft goes right after it."""
    for artifact in ("merged", "gguf"):
        order = pipeline_order(artifact, eval_after_gguf=True)
        assert sorted(order) == sorted(ORDER)
        assert order.index("eval-sft") == order.index("export-gguf") + 1
        assert order[-1] == "report"
        assert [s for s in order if s not in ("eval-sft", "serve")] == [s for s in ORDER if s not in ("eval-sft", "serve")]
    assert pipeline_order("merged", eval_after_gguf=False) == pipeline_order("merged")
    assert pipeline_order("merged", eval_after_gguf=True)[-4:] == ["serve", "export-gguf", "eval-sft", "report"]


def test_bad_stage_names() -> None:
    with pytest.raises(ConfigError, match=r"run.stages: unknown stage\(s\) finetune"):
        select_stages(["finetune"], None, None)
    with pytest.raises(ConfigError, match=r"--from convert-awq: not one of the run's stages"):
        select_stages(["preprocess-sft", "finetune-sft"], "convert-awq", None)
    with pytest.raises(ConfigError, match=r"--to bogus"):
        select_stages(["preprocess-sft"], None, "bogus")


def test_compose_runtime_without_docker_writes_no_run(tmp_path) -> None:
    """`ftpipe run --runtime compose` with no stack file and no Docker refuses in one line naming both,
    before a run folder or latest.txt exists."""
    import os

    from conftest import run_cli

    (tmp_path / "config.yaml").write_text("model:\n  id: org/model\ndata:\n  name: d\n  source: data/in.jsonl\n",
                                         encoding="utf-8")
    no_docker = tmp_path / "bin"  # a PATH without a docker client, whatever this machine has
    no_docker.mkdir()
    result = run_cli("run", "--config", str(tmp_path / "config.yaml"), "--runtime", "compose", cwd=tmp_path,
                     env={"PATH": f"{no_docker}{os.pathsep}/usr/bin/nonexistent"})
    assert result.code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --runtime compose: no docker-compose.yml in the project"), result.output
    assert "no docker client on PATH" in lines[0], result.output
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "logs").exists()


def test_force_goes_only_to_commands_that_take_it(tmp_path) -> None:
    """`ftpipe run --force`: every stage command gets --force except those without the option
    (the server step's start / smoke-test / stop), which would refuse it."""
    from types import SimpleNamespace

    from ftpipe import stages
    from ftpipe.core.runs import RunDir
    from ftpipe.pipeline import _steps

    run = RunDir(SimpleNamespace(), "r1")
    config = SimpleNamespace(serve=SimpleNamespace(artifact="merged"))
    common = ["--config", "c.yaml"]
    assert _steps(stages.get("finetune-sft"), common, run, True, config) == [
        ("train", ["finetune-sft", "--config", "c.yaml", "--run", "r1", "--force"])]
    assert _steps(stages.get("preprocess-sft"), common, run, True, config) == [
        ("train", ["preprocess-sft", "--config", "c.yaml", "--force"])]
    assert _steps(stages.get("serve"), common, run, True, config) == [
        ("serve", ["serve", "--detach", "--fallback", "--config", "c.yaml", "--run", "r1"]),
        ("serve", ["smoke-test", "--config", "c.yaml", "--run", "r1"]),
        ("serve", ["serve", "stop", "--config", "c.yaml", "--run", "r1"]),
    ]
    gguf = SimpleNamespace(serve=SimpleNamespace(artifact="gguf"))  # llama.cpp's server: the gguf env
    assert {env for env, _ in _steps(stages.get("serve"), common, run, False, gguf)} == {"gguf"}
    # Every command the pipeline builds parses against the real CLI: no option it does not take.
    from typer.testing import CliRunner

    from ftpipe.cli.main import app

    for name in ORDER:
        for _, argv in _steps(stages.get(name), common, run, True, config):
            res = CliRunner().invoke(app, [*argv, "--help"])
            assert res.exit_code == 0, (argv, res.output)


def test_import_gguf_is_a_first_step_that_run_only_takes_when_asked(tmp_path) -> None:
    """import-gguf can open `ftpipe run` (the real-model demo imports its model first); it is never in
    the default run.stages, and its manifest is the model folder's (logs/_models/<name>/), which the
    pipeline compares before and after to tell completed from skipped."""
    from types import SimpleNamespace

    from ftpipe import stages
    from ftpipe.core.runs import Project, RunDir
    from ftpipe.pipeline import _manifest_paths

    assert ORDER[0] == "import-gguf" and "import-gguf" not in stages.DEFAULT_STAGES
    assert select_stages(["preprocess-sft", "import-gguf"], None, "preprocess-sft") == ["import-gguf", "preprocess-sft"]
    project = Project(tmp_path, tmp_path / "prepared", tmp_path / "outputs", tmp_path / "logs")
    config = SimpleNamespace(import_gguf=SimpleNamespace(name="smollm2"), data=SimpleNamespace(name="travel"))
    run = RunDir(project, "r1")
    assert _manifest_paths(project, run, stages.get("import-gguf"), config) == [
        tmp_path / "logs/_models/smollm2/manifest.json"]
    assert _manifest_paths(project, run, stages.get("preprocess-sft"), config) == [
        tmp_path / "logs/_prepared/travel/manifest.json"]
