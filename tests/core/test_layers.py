"""The layers: core imports no stage package, and stage packages never import each other.

    cli -> stages table (ftpipe/stages.py, ftpipe/config.py, ftpipe/pipeline.py) -> stage packages
        -> handoff (what stages pass each other) -> core

Checked on the source (every import statement, module level or inside a function).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "src" / "ftpipe"
STAGE_PACKAGES = ("data", "training", "export", "eval", "serve")
ABOVE_CORE = (*STAGE_PACKAGES, "handoff", "cli", "stages", "config", "pipeline")


def imported(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every ftpipe import in a file, relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
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


def test_the_check_sees_imports(tmp_path: Path) -> None:
    """The scan finds module-level, function-level and relative imports (or the tests above prove nothing)."""
    sample = PACKAGE / "core" / "stage.py"
    names = [name for _, name in imported(sample)]
    assert "ftpipe.core.errors.InputError" in names  # imported inside a function
    assert "ftpipe.core.logs.stage_logging" in names  # imported at module level
