"""Every lock file is an environment the code and docs know: a stage environment, or a test one.

`bash scripts/bootstrap.sh all` builds every `requirements/*.lock`; the executor knows only the
stage environments, so a lock outside both lists would be built and never used (or used unseen).
"""

from __future__ import annotations

from conftest import REPO
from ftpipe.core.executor import ENVIRONMENTS

# Built by bootstrap, started by tests only (no stage runs there; docs/setup.md says so).
TEST_ENVIRONMENTS = {"labelstudio": ".venv-labelstudio"}


def test_every_lock_is_a_stage_or_test_environment() -> None:
    locks = {path.stem for path in (REPO / "requirements").glob("*.lock")}
    assert locks == set(ENVIRONMENTS) | set(TEST_ENVIRONMENTS)
    assert not set(ENVIRONMENTS) & set(TEST_ENVIRONMENTS)
    for name, env in ENVIRONMENTS.items():  # the venv bootstrap.sh builds for the lock
        assert env.venv == (".venv" if name == "train" else f".venv-{name}")


def test_setup_doc_names_every_lock() -> None:
    setup = (REPO / "docs/setup.md").read_text(encoding="utf-8")
    for path in (REPO / "requirements").glob("*.lock"):
        assert f"`requirements/{path.name}`" in setup, path.name


def test_the_demo_builds_the_stage_environments_only() -> None:
    """`bootstrap.sh stages` (demo.sh) = every lock but the test-only ones, which bootstrap lists itself."""
    import re

    bootstrap = (REPO / "scripts/bootstrap.sh").read_text()
    test_only = re.search(r'^TEST_ONLY="([^"]*)"$', bootstrap, re.M).group(1).split()
    assert set(test_only) == set(TEST_ENVIRONMENTS)
    assert "bash scripts/bootstrap.sh --background stages" in (REPO / "scripts/demo.sh").read_text()
    assert "bash scripts/bootstrap.sh all" in (REPO / "scripts/test.sh").read_text()
