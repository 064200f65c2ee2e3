"""The stage contract (ftpipe/core/stage.py): every row of the stage table names a module with
`check(ctx) -> inputs`, `plan(ctx) -> <Stage>Plan` (a frozen dataclass) and `run(ctx, plan)`, and
every `check` is pure: it leaves the options unchanged, writes nothing, opens no socket and starts
no process. `check` is what the host pre-flight and the pipeline's up-to-date test call, possibly
several times, so a side effect there would repeat (or happen in the wrong environment).

The purity test runs each stage's check on a copy of the shared SFT -> DPO project (tests/dpo_fixture.py),
where most checks get through to the end, under a Python audit hook that records every write-mode
open, file-system change, socket connection and process start.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import socket
import sys
import typing
from pathlib import Path

import pytest

from tests.dpo_fixture import copy_project

from ftpipe import stages
from ftpipe.core.errors import FtpipeError

# Events that change the file system, reach the network or start a process (the `open` event is
# judged by its mode). https://docs.python.org/3/library/audit_events.html
SIDE_EFFECTS = {
    "os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "os.symlink", "os.link", "os.truncate",
    "os.chmod", "os.chown", "os.utime", "shutil.copyfile", "shutil.copymode", "shutil.copystat", "shutil.copytree",
    "shutil.move", "shutil.rmtree", "shutil.make_archive", "socket.connect", "socket.bind", "socket.sendto",
    "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.startfile",
}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_recording: list[str] | None = None


def _hook(event: str, args: tuple) -> None:
    if _recording is None:
        return
    if event == "open":
        path, mode, flags = (tuple(args) + (None, None, None))[:3]
        if isinstance(path, (str, bytes, os.PathLike)) and str(os.fsdecode(path)).endswith(".pyc"):
            return  # an import writing its bytecode cache
        writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & WRITE_FLAGS)
        if writes:
            _recording.append(f"open({path!r}, {mode or flags!r})")
    elif event in SIDE_EFFECTS:
        _recording.append(f"{event}{tuple(str(a)[:120] for a in args)}")


sys.addaudithook(_hook)  # audit hooks cannot be removed: this one records only inside `recorded()`


class recorded:
    """Context manager: the side effects (audit events) of the code inside it."""

    def __enter__(self) -> list[str]:
        global _recording
        self.events: list[str] = []
        _recording = self.events
        return self.events

    def __exit__(self, *exc) -> None:
        global _recording
        _recording = None


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under root with its size and modification time."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            continue
        st = path.stat()
        out[path.relative_to(root).as_posix()] = (st.st_size if path.is_file() else -1, st.st_mtime_ns)
    return out


# What each stage's command hands it beyond config keys (the table's keyless options), as a user would.
OPTIONS = {
    "finetune-sft": {"resume_from": None},
    "finetune-dpo": {"resume_from": "auto"},
    "export-gguf": {"source": None},
    "ollama-load": {"dry_run": True},
    "serve": {"detach": True, "fallback": True},
}


def test_the_recorder_sees_side_effects(tmp_path: Path) -> None:
    """A write, a folder, a connection attempt and a process are each recorded (or the test below proves nothing)."""
    with recorded() as events:
        (tmp_path / "f.txt").write_text("x")
        (tmp_path / "d").mkdir()
        with socket.socket() as sock:
            sock.settimeout(0.2)
            try:
                sock.connect(("127.0.0.1", 9))
            except OSError:
                pass
        import subprocess

        subprocess.run(["true"], check=True)
        (tmp_path / "f.txt").read_text()
    kinds = [e.split("(")[0] for e in events]
    assert kinds == ["open", "os.mkdir", "socket.connect", "subprocess.Popen"], events


@pytest.mark.parametrize("row", stages.STAGES, ids=lambda r: r.name)
def test_every_stage_has_check_plan_and_run(row: stages.Stage) -> None:
    module = stages.module(row)
    assert not hasattr(module, "prepare"), f"{row.module}: prepare() is gone; check/plan/run"
    for name in ("check", "plan", "run"):
        assert callable(getattr(module, name, None)), f"{row.module}: no {name}()"
    assert list(inspect.signature(module.check).parameters) == ["ctx"]
    assert list(inspect.signature(module.plan).parameters) == ["ctx"]
    assert list(inspect.signature(module.run).parameters) == ["ctx", "plan"]
    plan_type = typing.get_type_hints(module.plan)["return"]
    assert dataclasses.is_dataclass(plan_type) and plan_type.__dataclass_params__.frozen, plan_type
    assert plan_type.__name__ == "".join(w.capitalize() for w in row.name.split("-")) + "Plan"
    assert plan_type.__module__ == row.module  # the stage's own plan, not a shared catch-all
    assert [f.name for f in dataclasses.fields(plan_type)] == list(typing.get_type_hints(plan_type))  # typed fields
    assert typing.get_type_hints(module.run)["plan"] is plan_type
    assert set(typing.get_type_hints(module.check)) == {"ctx", "return"}


@pytest.fixture(scope="module")
def checked_project(sft_dpo_project, tmp_path_factory) -> Path:
    """A copy of the SFT -> DPO project; it holds the raw files its config names (tests/project_factory.py),
    so the data checks pass."""
    return copy_project(sft_dpo_project, tmp_path_factory.mktemp("contract") / "proj")


def _check(row: stages.Stage, root: Path):
    """(outcome, side effects, tree before, tree after, options before, options after) of the row's check."""
    from ftpipe.config import load_config

    loaded = load_config(root / "config.yaml")
    options = dict(OPTIONS.get(row.name, {}))
    ctx = stages.context(row, loaded, "r1", False, None, **options)
    before = tree(root)
    with recorded() as events:
        try:
            outcome: object = stages.module(row).check(ctx)
        except FtpipeError as exc:
            outcome = exc
    return outcome, events, before, tree(root), options, dict(ctx.options)


def test_every_check_is_pure(checked_project: Path) -> None:
    """Run every stage's check; none writes, connects or spawns, and the options come back unchanged.

    Most checks get through on this project (their inputs exist); a refusal must be one line."""
    passed, refused, impure = [], {}, {}
    for row in stages.STAGES:
        outcome, events, before, after, options, options_after = _check(row, checked_project)
        if events or before != after or options != options_after:
            changed = sorted(set(before.items()) ^ set(after.items()))[:5]
            impure[row.name] = {"events": events[:5], "tree": changed, "options": options_after}
        if isinstance(outcome, FtpipeError):
            refused[row.name] = outcome.one_line()
            assert "\n" not in refused[row.name]
        else:
            assert isinstance(outcome, dict) and outcome, f"{row.name}: check returned {outcome!r}"
            passed.append(row.name)
    assert impure == {}
    # Not one check fails for lack of an input the project has: the ones refused need a GGUF or a server,
    # or (import-gguf) a GGUF to import, which this project does not name (tests/ingest checks its check).
    assert set(refused) <= {"ollama-load", "smoke-test", "serve", "import-gguf"}, refused
    assert {"preprocess-sft", "preprocess-dpo", "finetune-dpo", "export-merged", "convert-awq", "eval-sft",
            "export-gguf", "report"} <= set(passed), (passed, refused)
