"""docs/families.md's matrix is the one the family tier (test_family_matrix.py, collected before
this file) saw in this session: every family's row carries that session's stamp."""

from __future__ import annotations

import json
import os
import re

import pytest

from conftest import FAMILY_NAMES, REPO
from family_matrix import RESULTS, render_table

pytestmark = pytest.mark.slow


def test_docs_table_is_the_matrix(session_stamp) -> None:
    """docs/families.md's matrix says what this tier saw (run after the rows above)."""
    data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    missing = [n for n in FAMILY_NAMES if data.get(n, {}).get("session") != session_stamp]
    assert not missing, f"the family tier did not run for {missing} in this session (run tests/e2e/test_family_matrix.py with this file)"
    want = render_table(data)
    doc = (REPO / "docs/families.md").read_text(encoding="utf-8")
    if os.environ.get("FTPIPE_UPDATE_DOCS") == "1":
        doc = re.sub(r"<!-- matrix -->.*<!-- /matrix -->", lambda _: want, doc, flags=re.S)
        (REPO / "docs/families.md").write_text(doc, encoding="utf-8")
    assert want in doc, "docs/families.md's matrix differs from this run: FTPIPE_UPDATE_DOCS=1 rewrites it\n" + want
