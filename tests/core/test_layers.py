"""The layers: core imports no stage package, and stage packages never import each other.

    cli -> stages table (ftpipe/stages.py, ftpipe/config.py) -> stage packages
        -> handoff (what stages pass each other) -> core
    cli -> pipeline (runs each stage as its own command) -> stages table, handoff, core

Within a stage package, a stage's command module (the module its row of the table names) is
imported by nobody but the table: code two stages share lives in a shared module. A stage gets
what the table knows through its context (`ctx.spec`, `ctx.producers`), never by importing it.
Checked on the source (every import statement, module level or inside a function).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "src" / "ftpipe"
STAGE_PACKAGES = ("data", "training", "export", "eval", "serve", "ingest")
ABOVE_CORE = (*STAGE_PACKAGES, "handoff", "cli", "stages", "config", "pipeline")


def imported(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every ftpipe import in a file, relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parts = path.with_suffix("").parts
    package = ".".join(parts[len(parts) - 1 - parts[::-1].index("ftpipe"):-1])  # from the last folder named ftpipe
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            found += [(node.lineno, f"{base}.{alias.name}" if alias.name != "*" else base) for alias in node.names]
    return [(line, name) for line, name in found if name == "ftpipe" or name.startswith("ftpipe.")]


def top(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def violations(folder: str, forbidden) -> list[str]:
    out = []
    for path in sorted((PACKAGE / folder).rglob("*.py")):
        for line, name in imported(path):
            if forbidden(top(name)):
                out.append(f"{path.relative_to(REPO)}:{line}: imports {name}")
    return out


def test_core_imports_no_stage() -> None:
    assert violations("core", lambda t: t in ABOVE_CORE) == []


def test_handoff_imports_only_core() -> None:
    assert violations("handoff", lambda t: t in (*STAGE_PACKAGES, "cli", "pipeline", "config")) == []


@pytest.mark.parametrize("package", STAGE_PACKAGES)
def test_stage_packages_do_not_import_each_other(package: str) -> None:
    others = set(STAGE_PACKAGES) - {package}
    assert violations(package, lambda t: t in others or t in ("cli", "pipeline")) == []


def _command_modules() -> dict[str, str]:
    """Dotted command module -> its stage name, from the stage table."""
    from ftpipe.stages import STAGES

    return {row.module: row.name for row in STAGES}


def command_module_leaks(package_dir: Path, commands: dict[str, str]) -> list[str]:
    """Imports, inside the stage packages under `package_dir` (a folder named ftpipe), of a stage's
    command module by any module but itself."""
    found = []
    for package in STAGE_PACKAGES:
        for path in sorted((package_dir / package).rglob("*.py")):
            own = ".".join(path.relative_to(package_dir.parent).with_suffix("").parts)
            for line, name in imported(path):
                hit = next((m for m in commands if name == m or name.startswith(m + ".")), None)
                if hit is not None and hit != own:
                    found.append(f"{path.relative_to(package_dir.parent)}:{line}: imports {name} (the {commands[hit]} command)")
    return found


def table_leaks(package_dir: Path) -> list[str]:
    """Imports of the stage table (or what sits above it) from a stage package or handoff."""
    found = []
    for package in (*STAGE_PACKAGES, "handoff"):
        for path in sorted((package_dir / package).rglob("*.py")):
            found += [f"{path.relative_to(package_dir.parent)}:{line}: imports {name}" for line, name in imported(path)
                      if top(name) in ("stages", "config", "pipeline", "cli")]
    return found


def test_no_stage_imports_another_stages_command_module() -> None:
    assert command_module_leaks(PACKAGE, _command_modules()) == []


def test_no_stage_package_imports_the_stage_table() -> None:
    assert table_leaks(PACKAGE) == []


def test_the_pipeline_imports_no_stage_package() -> None:
    path = PACKAGE / "pipeline.py"
    found = [f"pipeline.py:{line}: imports {name}" for line, name in imported(path) if top(name) in STAGE_PACKAGES]
    assert found == []


def test_the_rules_see_a_leak(tmp_path: Path) -> None:
    """Each rule above reports a leak written into a copy of a stage package (or they prove nothing)."""
    fake = tmp_path / "ftpipe"
    for package in (*STAGE_PACKAGES, "handoff"):
        (fake / package).mkdir(parents=True)
    (fake / "data" / "preprocess_sft.py").write_text("from ftpipe.data.shared import rows\n", encoding="utf-8")
    (fake / "eval" / "eval_sft.py").write_text(
        "from ftpipe.stages import PRODUCED_BY\n\ndef f():\n    from ftpipe.data.preprocess_sft import check\n",
        encoding="utf-8")
    commands = {"ftpipe.data.preprocess_sft": "preprocess-sft", "ftpipe.eval.eval_sft": "eval-sft"}
    assert command_module_leaks(fake, commands) == [
        "ftpipe/eval/eval_sft.py:4: imports ftpipe.data.preprocess_sft.check (the preprocess-sft command)"]
    assert table_leaks(fake) == ["ftpipe/eval/eval_sft.py:1: imports ftpipe.stages.PRODUCED_BY"]
    pipeline = fake / "pipeline.py"
    pipeline.write_text("from ftpipe.training.tiny_model import build\n", encoding="utf-8")
    assert [n for _, n in imported(pipeline) if top(n) in STAGE_PACKAGES] == ["ftpipe.training.tiny_model.build"]


def test_the_check_sees_imports(tmp_path: Path) -> None:
    """The scan finds module-level, function-level and relative imports (or the tests above prove nothing)."""
    sample = PACKAGE / "core" / "stage.py"
    names = [name for _, name in imported(sample)]
    assert "ftpipe.core.errors.InputError" in names  # imported inside a function
    assert "ftpipe.core.logs.stage_logging" in names  # imported at module level
