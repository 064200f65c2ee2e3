"""Stage lifecycle and manifests: written last and atomically, skip when up to date, never torn."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftpipe.config import load_config
from ftpipe.core.errors import InputError, StageError
from ftpipe.core.fsutil import atomic_write_json
from ftpipe.core.manifest import read_manifest
from ftpipe.core.runs import Project, new_run
from ftpipe.core.stage import StageContext, StageResult, execute, require_completed


@pytest.fixture
def setup(tmp_path: Path):
    cfg = tmp_path / "config.yaml"
    cfg.write_text("model:\n  path: m\n", encoding="utf-8")
    (tmp_path / "in.txt").write_text("input v1", encoding="utf-8")
    loaded = load_config(cfg, environ={})
    project = Project.from_config(loaded)
    run = new_run(project, "r1")
    return tmp_path, loaded, project, run


def no_plan(ctx: StageContext) -> None:
    return None


def writer(calls: list):
    def run(ctx: StageContext, plan: None) -> StageResult:
        calls.append(1)
        out = ctx.run.path / "thing"
        out.mkdir(exist_ok=True)
        (out / "a.bin").write_bytes(b"x" * 10)
        logging.getLogger("ftpipe.test").info("working on %s", ctx.run.name)
        return StageResult(outputs=[out], metrics={"score": 1.5}, summary="done")
    return run


def test_completed_manifest_then_skip_then_rerun_on_change(setup) -> None:
    root, loaded, project, run = setup
    calls: list = []
    ctx = StageContext.for_run("demo-stage", loaded, run)
    result = execute(ctx, no_plan, writer(calls), sections=("finetune",), inputs={"data": root / "in.txt"})
    m = read_manifest(run.manifest_path("demo-stage"))
    assert m["status"] == "completed" and m["run"] == "r1" and m["stage"] == "demo-stage"
    assert m["schema_version"] == 1 and m["finished_at"] and m["config_hash"]
    import hashlib

    assert m["outputs"] == [{"path": "outputs/r1/thing/a.bin", "bytes": 10,
                             "sha256": hashlib.sha256(b"x" * 10).hexdigest()}]
    assert m["inputs"]["data"]["path"] == "in.txt" and len(m["inputs"]["data"]["sha256"]) == 64
    assert m["metrics"]["score"] == 1.5 and "python" in m["versions"]
    assert "working on r1" in (run.log_dir("demo-stage") / "run.log").read_text()
    assert not result.skipped and len(calls) == 1

    again = execute(ctx, no_plan, writer(calls), sections=("finetune",), inputs={"data": root / "in.txt"})
    assert again.skipped and len(calls) == 1 and again.metrics["score"] == 1.5

    # an unrelated section changing does not rerun; the stage's own section does
    other = load_config(root / "config.yaml", ["eval.max_new_tokens=3"], environ={})
    assert execute(StageContext.for_run("demo-stage", other, run), no_plan, writer(calls), sections=("finetune",), inputs={"data": root / "in.txt"}).skipped
    changed = load_config(root / "config.yaml", ["finetune.lora_r=2"], environ={})
    execute(StageContext.for_run("demo-stage", changed, run), no_plan, writer(calls), sections=("finetune",), inputs={"data": root / "in.txt"})
    assert len(calls) == 2

    # a changed input reruns; a deleted output reruns; --force reruns
    (root / "in.txt").write_text("input v2", encoding="utf-8")
    execute(StageContext.for_run("demo-stage", changed, run), no_plan, writer(calls), sections=("finetune",), inputs={"data": root / "in.txt"})
    assert len(calls) == 3
    (run.path / "thing/a.bin").unlink()
    execute(StageContext.for_run("demo-stage", changed, run), no_plan, writer(calls), sections=("finetune",), inputs={"data": root / "in.txt"})
    assert len(calls) == 4
    execute(StageContext.for_run("demo-stage", changed, run, force=True), no_plan, writer(calls), sections=("finetune",), inputs={"data": root / "in.txt"})
    assert len(calls) == 5


def test_failure_is_recorded_and_reraised(setup) -> None:
    root, loaded, project, run = setup

    def boom(ctx, plan):
        raise StageError("it broke", hint="ftpipe finetune-sft --force")

    with pytest.raises(StageError):
        execute(StageContext.for_run("bad", loaded, run), no_plan, boom, sections=(), inputs={})
    m = read_manifest(run.manifest_path("bad"))
    assert m["status"] == "failed"
    assert m["error"] == "it broke (next: ftpipe finetune-sft --force)"
    with pytest.raises(InputError, match="stage bad is failed") as exc:
        require_completed(run, "bad", "ftpipe bad")
    assert exc.value.hint == "ftpipe bad --run r1"
    with pytest.raises(InputError, match="stage nothing is missing"):
        require_completed(run, "nothing", "ftpipe nothing")


KILL_WRITER = r"""
import sys, itertools
from ftpipe.core.fsutil import atomic_write_json
path = sys.argv[1]
print("ready", flush=True)
for i in itertools.count():
    atomic_write_json(path, {"i": i, "status": "completed", "pad": "x" * 200000})
"""


def test_manifest_valid_json_when_writer_is_killed(tmp_path: Path) -> None:
    target = tmp_path / "manifest.json"
    atomic_write_json(target, {"i": -1, "status": "completed"})
    for attempt in range(8):
        proc = subprocess.Popen([sys.executable, "-c", KILL_WRITER, str(target)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.05 + 0.03 * attempt)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        data = json.loads(target.read_text())  # never torn
        assert data["status"] == "completed" and isinstance(data["i"], int)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "manifest.json"]
    # killed mid-write leaves at most stray temp files, never a partial manifest.json
    assert all(name.startswith(".manifest.json.") and name.endswith(".tmp") for name in leftovers)


def test_plan_runs_once_and_only_when_the_stage_runs(setup) -> None:
    """execute: plan(ctx) once, its value handed to run; an up-to-date stage plans nothing."""
    from dataclasses import dataclass

    root, loaded, project, run = setup

    @dataclass(frozen=True)
    class DemoPlan:
        size: int

    planned: list = []

    def plan(ctx: StageContext) -> DemoPlan:
        planned.append(ctx.stage)
        return DemoPlan(size=3)

    def body(ctx: StageContext, plan: DemoPlan) -> StageResult:
        out = ctx.run.path / "sized.bin"
        out.write_bytes(b"x" * plan.size)
        return StageResult(outputs=[out])

    ctx = StageContext.for_run("planned", loaded, run)
    execute(ctx, plan, body, sections=("finetune",), inputs={"data": root / "in.txt"})
    assert planned == ["planned"] and (run.path / "sized.bin").read_bytes() == b"xxx"
    assert execute(ctx, plan, body, sections=("finetune",), inputs={"data": root / "in.txt"}).skipped
    assert planned == ["planned"]


def test_a_remote_input_is_never_up_to_date(setup) -> None:
    """An input on a server (check may not connect) is recorded by address and always reruns the stage."""
    from ftpipe.core.manifest import Remote
    from ftpipe.core.stage import up_to_date

    root, loaded, project, run = setup
    calls: list = []
    inputs = {"source": Remote("http://127.0.0.1:8080/api/projects/3")}
    ctx = StageContext.for_run("remote-stage", loaded, run)
    execute(ctx, no_plan, writer(calls), sections=("finetune",), inputs=inputs)
    assert read_manifest(run.manifest_path("remote-stage"))["inputs"] == {
        "source": {"remote": "http://127.0.0.1:8080/api/projects/3"}}
    assert not up_to_date(ctx, sections=("finetune",), inputs=inputs)
    assert not execute(ctx, no_plan, writer(calls), sections=("finetune",), inputs=inputs).skipped
    assert len(calls) == 2


def test_options_are_read_only(setup) -> None:
    root, loaded, project, run = setup
    ctx = StageContext.for_run("demo-stage", loaded, run, resume_from="latest")
    assert ctx.options["resume_from"] == "latest"
    with pytest.raises(TypeError):
        ctx.options["source"] = "elsewhere"  # type: ignore[index]


def test_killed_stage_is_never_completed(setup) -> None:
    root, loaded, project, run = setup
    script = (
        "import sys, time\n"
        "from ftpipe.config import load_config\n"
        "from ftpipe.core.runs import Project, RunDir\n"
        "from ftpipe.core.stage import StageContext, StageResult, execute\n"
        "loaded = load_config(sys.argv[1], environ={})\n"
        "run = RunDir(Project.from_config(loaded), 'r1')\n"
        "def body(ctx, plan):\n"
        "    print('started', flush=True); time.sleep(60); return StageResult()\n"
        "execute(StageContext.for_run('slow', loaded, run), lambda ctx: None, body, sections=(), inputs={})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(root / "config.yaml")], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "started"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert read_manifest(run.manifest_path("slow"))["status"] == "running"
    with pytest.raises(InputError, match="stage slow is running"):
        require_completed(run, "slow", "ftpipe slow")


def test_exclusive_makes_a_second_process_wait_for_the_first(tmp_path) -> None:
    """fsutil.exclusive: while one process holds the lock, another's `with exclusive(...)` waits; it
    enters once the holder leaves (the llama.cpp material and the package cache fill under it)."""
    import subprocess
    import sys
    import time

    from ftpipe.core.fsutil import exclusive

    lock, order = tmp_path / ".fetch.lock", tmp_path / "order.txt"
    waiter = ("import sys, pathlib; from ftpipe.core.fsutil import exclusive\n"
              "with exclusive(pathlib.Path(sys.argv[1])):\n"
              "    open(sys.argv[2], 'a').write('second\\n')\n")
    with exclusive(lock):
        proc = subprocess.Popen([sys.executable, "-c", waiter, str(lock), str(order)])
        time.sleep(3)  # the other process has started and is waiting for the lock
        assert proc.poll() is None and not order.exists()
        order.write_text("first\n")
    assert proc.wait(timeout=60) == 0
    assert order.read_text().split() == ["first", "second"]
