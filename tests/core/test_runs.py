"""Run folders: names are checked, concurrent runs get distinct folders, pointers never torn."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from conftest import run_cli
from ftpipe.core.errors import InputError
from ftpipe.core.runs import Project, RunDir, new_run, open_run, slug, validate_name


def make_project(root: Path) -> Project:
    return Project(root=root, prepared=root / "prepared", outputs=root / "outputs", logs=root / "logs")


@pytest.mark.parametrize("bad", ["../etc", "..", "/etc/passwd", "a/b", "", ".hidden", "x" * 101, "a..b", "run name"])
def test_bad_run_names_refused(bad: str) -> None:
    with pytest.raises(InputError, match="is not allowed"):
        validate_name(bad)


def test_good_names_and_slug() -> None:
    assert validate_name("run-qwen2-5-1") == "run-qwen2-5-1"
    assert slug("Qwen/Qwen2.5-0.5B-Instruct") == "qwen2-5-0-5b-instruct"
    assert slug("models/tiny/") == "tiny"


def test_new_run_layout_and_latest(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    run = new_run(project, model="Qwen/Qwen2.5-0.5B", data="alpaca")
    assert run.name == "run-qwen2-5-0-5b-alpaca-1"
    assert run.path.is_dir() and run.log_root.is_dir()
    assert (tmp_path / "outputs/latest.txt").read_text() == "run-qwen2-5-0-5b-alpaca-1\n"
    assert (tmp_path / "logs/latest.txt").read_text() == "run-qwen2-5-0-5b-alpaca-1\n"
    second = new_run(project, model="Qwen/Qwen2.5-0.5B", data="alpaca")
    assert second.name.endswith("-2")
    assert open_run(project).name == second.name
    assert run.adapter == tmp_path / "outputs" / run.name / "adapter"
    assert run.manifest_path("finetune-sft") == tmp_path / "logs" / run.name / "finetune-sft/manifest.json"


def test_explicit_name_is_reused(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    assert new_run(project, "mine").name == "mine"
    assert new_run(project, "mine").name == "mine"
    with pytest.raises(InputError):
        new_run(project, "../etc")


def test_open_run_errors(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    with pytest.raises(InputError, match="no run yet") as exc:
        open_run(project)
    assert exc.value.hint.startswith("ftpipe finetune-sft")
    with pytest.raises(InputError, match="run 'ghost' not found"):
        open_run(project, "ghost")


def _create(args) -> str:
    root, i = args
    return new_run(make_project(Path(root)), model="m", data="d").name


def test_concurrent_runs_get_distinct_folders(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(6) as pool:
        names = pool.map(_create, [(str(tmp_path), i) for i in range(24)])
    assert len(set(names)) == 24
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir() if p.is_dir()) == sorted(names)
    latest = (tmp_path / "outputs/latest.txt").read_text()
    assert latest.strip() in names and latest.endswith("\n")


def test_cli_refuses_traversal_run_name() -> None:
    result = run_cli("print-runtime", "--config", "debug_config.yaml", "--run", "../etc")
    assert result.code == 2
    assert "Traceback" not in result.output
    assert result.stderr.strip().startswith("error: run name '../etc' is not allowed")


def test_rundir_stages_lists_manifests(tmp_path: Path) -> None:
    run = RunDir(make_project(tmp_path), "r1")
    assert run.stages() == []
    run.log_dir("finetune-sft").mkdir(parents=True)
    (run.manifest_path("finetune-sft")).write_text("{}")
    run.log_dir("empty").mkdir()
    assert run.stages() == ["finetune-sft"]
