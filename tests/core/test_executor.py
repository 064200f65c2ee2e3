"""Executor: which environment each stage runs in, and the exact commands it builds."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ftpipe.core.errors import InputError, StageError
from ftpipe.core.executor import (
    ENVIRONMENTS,
    compose_command,
    environment,
    in_environment,
    local_command,
    run_tool,
)


def environment_for(stage: str):
    """The environment the stage table gives a stage."""
    from ftpipe import stages

    return environment(stages.get(stage).environment)


def test_stage_environments() -> None:
    assert environment_for("finetune-sft").venv == ".venv"
    assert environment_for("convert-awq").venv == ".venv-awq"
    assert environment_for("serve").service == "vllm-server"
    assert environment_for("export-gguf").name == "gguf"


def test_compose_command_exact() -> None:
    cmd = compose_command(Path("/proj"), ENVIRONMENTS["awq"], ["convert-awq", "--run", "r1"], uid=1001, gid=1002)
    assert cmd == [
        "docker", "compose", "-f", "/proj/docker-compose.yml", "run", "--rm", "--user", "1001:1002",
        "-e", "FTPIPE_ENV=awq", "-e", "FTPIPE_SERVICE=awq-runner", "awq-runner",
        "ftpipe", "convert-awq", "--run", "r1",
    ]


def test_local_command_and_missing_venv(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FTPIPE_VENV_ROOT", str(tmp_path))
    with pytest.raises(InputError, match=r"environment 'awq' is not installed \(\.venv-awq/ missing\)") as exc:
        local_command(tmp_path, ENVIRONMENTS["awq"], ["convert-awq"])
    assert exc.value.hint == "bash scripts/bootstrap.sh awq"
    python = tmp_path / ".venv-awq/bin/python"
    python.parent.mkdir(parents=True)
    python.write_text("")
    assert local_command(tmp_path, ENVIRONMENTS["awq"], ["convert-awq"]) == [str(python), "-m", "ftpipe", "convert-awq"]
    assert not in_environment(tmp_path, ENVIRONMENTS["awq"])


def test_run_tool_failure_names_command_and_tail(tmp_path: Path) -> None:
    log = tmp_path / "tool.log"
    assert run_tool(["echo", "hello"], log_file=log).strip() == "hello"
    with pytest.raises(StageError, match=r"`sh -c echo nope >&2; exit 3` failed with exit 3: nope"):
        run_tool(["sh", "-c", "echo nope >&2; exit 3"], log_file=log)
    assert "hello" in log.read_text() and "nope" in log.read_text()
    with pytest.raises(StageError, match="not found"):
        run_tool(["definitely-not-a-tool-xyz"])


def test_a_stage_waits_for_a_background_build(tmp_path: Path, monkeypatch, caplog) -> None:
    """`bootstrap.sh --background` (demo.sh) marks the venv with its pid: a stage that needs it waits
    until the marker is gone, saying what it waits for, then runs in the finished venv."""
    import logging
    import subprocess
    import threading

    from ftpipe.core.executor import wait_for_build

    monkeypatch.setenv("FTPIPE_VENV_ROOT", str(tmp_path))
    env = ENVIRONMENTS["gguf"]
    folder = tmp_path / ".venv-gguf"
    (folder / "bin").mkdir(parents=True)
    builder = subprocess.Popen(["sleep", "30"])  # stands in for the live bootstrap.sh process
    try:
        (folder / ".ftpipe-building").write_text(f"{builder.pid}\n")
        (tmp_path / "logs/bootstrap").mkdir(parents=True)
        (tmp_path / "logs/bootstrap/gguf.log").write_text("bootstrap: building .venv-gguf\n")

        def finish() -> None:
            (folder / "bin/python").write_text("")
            (folder / ".ftpipe-building").unlink()

        timer = threading.Timer(1.5, finish)
        timer.start()
        with caplog.at_level(logging.INFO, logger="ftpipe.core.executor"):
            argv = local_command(tmp_path, env, ["export-gguf"])
        timer.join()
    finally:
        builder.kill()
        builder.wait()
    assert argv == [str(folder / "bin/python"), "-m", "ftpipe", "export-gguf"]
    waiting = [r.getMessage() for r in caplog.records if "waiting for environment gguf" in r.getMessage()]
    assert waiting and f"pid {builder.pid}" in waiting[0] and "logs/bootstrap/gguf.log" in waiting[0]
    assert any(r.getMessage().startswith("environment gguf is ready (waited ") for r in caplog.records)
    assert wait_for_build(tmp_path, env) < 1.0  # nothing to wait for now


def test_a_build_that_died_is_one_clear_error(tmp_path: Path, monkeypatch) -> None:
    import subprocess

    monkeypatch.setenv("FTPIPE_VENV_ROOT", str(tmp_path))
    folder = tmp_path / ".venv-gguf"
    (folder / "bin").mkdir(parents=True)
    (folder / "bin/python").write_text("")
    dead = subprocess.Popen(["true"])
    dead.wait()
    (folder / ".ftpipe-building").write_text(f"{dead.pid}\n")
    with pytest.raises(InputError, match=r"environment 'gguf' did not finish building \(\.venv-gguf/ is incomplete\)") as exc:
        local_command(tmp_path, ENVIRONMENTS["gguf"], ["export-gguf"])
    assert exc.value.hint == "bash scripts/bootstrap.sh gguf"


# --runtime compose: what it lacks is said at once, before anything runs (issue: a machine with a
# Docker engine ran `docker compose -f <project>/docker-compose.yml` in a project without one).
STACK = "services:\n" + "".join(f"  {e.service}:\n    image: ftpipe-{e.service}:local\n" for e in ENVIRONMENTS.values())


@pytest.mark.parametrize("stack, docker, built, expected", [
    (False, dict(client=False, engine=False, compose=False), True,
     [r"no docker-compose\.yml in the project", r"no docker client on PATH"]),
    (False, dict(client=True, engine=False, compose=False), True,
     [r"no docker-compose\.yml in the project .*the ftpipe repository's docker-compose\.yml", r"no Docker engine answers"]),
    (False, dict(client=True, engine=True, compose=True), True, [r"no docker-compose\.yml in the project"]),
    (True, dict(client=True, engine=False, compose=False), True, [r"^--runtime compose: no Docker engine answers"]),
    (True, dict(client=True, engine=True, compose=False), True, [r"no compose plugin"]),
    (True, dict(client=True, engine=True, compose=True), False, [r"image\(s\) not built: sft \(ftpipe-sft:local\), "
                                                                  r"awq-runner \(ftpipe-awq-runner:local\)"]),
])
def test_compose_preflight_names_every_missing_part(tmp_path: Path, monkeypatch, stack, docker, built, expected) -> None:
    from ftpipe.core import executor

    if stack:
        (tmp_path / "docker-compose.yml").write_text(STACK)
    monkeypatch.setattr(executor, "docker_available", lambda: docker)
    monkeypatch.setattr(executor, "_quiet", lambda argv: built)
    with pytest.raises(InputError) as caught:
        executor.require_compose(tmp_path)
    line = caught.value.one_line()
    assert "\n" not in line
    for pattern in expected:
        assert re.search(pattern, line), line
    if not stack:
        assert "(next: run from the ftpipe repository" in line
    elif not built:
        assert "(next: docker compose build" in line
    else:
        assert "(next: start the Docker engine" in line


def test_compose_preflight_passes_when_everything_is_there(tmp_path: Path, monkeypatch) -> None:
    from ftpipe.core import executor

    (tmp_path / "docker-compose.yml").write_text(STACK)
    asked: list[list[str]] = []
    monkeypatch.setattr(executor, "docker_available", lambda: dict(client=True, engine=True, compose=True))
    monkeypatch.setattr(executor, "_quiet", lambda argv: asked.append(argv) or True)
    executor.require_compose(tmp_path)
    assert sorted(a[-1] for a in asked) == sorted(f"ftpipe-{e.service}:local" for e in ENVIRONMENTS.values())


def test_compose_preflight_on_this_machine(tmp_path: Path) -> None:
    """No fake: in a project without a stack file the refusal says so, and names the engine exactly
    when this machine has none (the docs tier runs the documented command the same way)."""
    import shutil
    import subprocess

    from ftpipe.core import executor

    engine = shutil.which("docker") is not None and subprocess.run(
        ["docker", "info"], capture_output=True, timeout=30).returncode == 0
    with pytest.raises(InputError) as caught:
        executor.require_compose(tmp_path)
    line = caught.value.one_line()
    assert "no docker-compose.yml in the project" in line
    assert ("Docker engine answers" in line or "docker client" in line) is not engine, line


def test_repo_stack_names_an_image_for_every_environment() -> None:
    from ftpipe.core.executor import service_images

    images = service_images(Path(__file__).resolve().parents[2] / "docker-compose.yml")
    assert set(images) == {e.service for e in ENVIRONMENTS.values()}
