"""`ftpipe report`: one self-contained page, rendered in headless Chromium (Debian `chromium`).

The slow test renders the report of the fine-tuned, evaluated run, screenshots it (non-blank),
and checks the rendered DOM: loss curve (an <svg> with a path), the comparison table, no broken
image. The fast tests cover a partial run and hostile text.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.eval.conftest import RUN, cli, make_project

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Run headless Chromium with a fresh profile; fails (never skips) when it is not installed."""
    exe = shutil.which("chromium")
    assert exe, "Debian package `chromium` is needed: apt-get install -y chromium"
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.glob('chromium-profile-*')))}"
    return subprocess.run(
        [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=180, check=True,
    )


class Dom(HTMLParser):
    """Just enough of the rendered DOM: elements with their attributes and parents, and text."""

    VOID = {"img", "br", "meta", "link", "input", "hr", "source"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[str, dict]] = []
        self.elements: list[tuple[str, dict, list[tuple[str, dict]]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.elements.append((tag, attrs, list(self.stack)))
        if tag not in self.VOID:
            self.stack.append((tag, attrs))

    def handle_startendtag(self, tag, attrs):
        self.elements.append((tag, dict(attrs), list(self.stack)))

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                break

    def handle_data(self, data):
        self.text.append(data)

    def inside(self, tag: str, **attrs) -> list[tuple[str, dict, list]]:
        """Elements that have an ancestor `tag` with the given attributes."""
        return [e for e in self.elements if any(t == tag and all(a.get(k) == v for k, v in attrs.items()) for t, a in e[2])]


@pytest.mark.slow
def test_report_renders_in_chromium(evaluated, tmp_path):
    from PIL import Image, ImageStat

    root, eval_result = evaluated
    assert eval_result.code == 0, eval_result.output
    result = cli("report", root, "--run", RUN)
    assert result.code == 0, result.output
    page = root / "outputs" / RUN / "report.html"
    assert "report: outputs/r1/report.html" in result.stdout

    shot = tmp_path / "report.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2400", page.as_uri())
    image = Image.open(shot).convert("L")
    assert image.size == (1280, 2400)
    stat = ImageStat.Stat(image)
    assert stat.var[0] > 200, f"screenshot looks blank (variance {stat.var[0]:.1f})"
    assert image.getextrema() == (0, 255) or image.getextrema()[0] < 64  # dark text on a light page

    dom = Dom()
    dom.feed(chromium(tmp_path, "--dump-dom", page.as_uri()).stdout)
    # The loss curve: an inline SVG with one path per series (train and eval loss).
    loss_paths = [a for t, a, _ in dom.inside("div", id="loss-curves") if t == "path"]
    assert {a.get("data-series") for a in loss_paths} >= {"train/loss", "eval/loss"}
    assert all(len(a["d"].split("L")) >= 2 for a in loss_paths)
    # The comparison table: one row per artifact, with the statuses.
    cells = [e for e in dom.inside("table", id="comparison") if e[0] == "td"]
    assert len(cells) == 8 * 12
    # Answers side by side: the 3 checks (report.side_by_side 5), prompt, expectation, base / adapter / merged.
    side = [e for e in dom.inside("table", id="side-by-side-table") if e[0] == "td"]
    assert len(side) == 3 * (2 + 3)
    text = " ".join(dom.text)
    assert "exact: positive; must_stop: true" in text
    for needle in ("base", "adapter", "merged", "awq", "skipped", "not produced (ftpipe convert-awq --run r1)",
                   "not produced (ftpipe finetune-dpo --run r1)",
                   "Token-length histogram", "eval/loss", "sha256", "finetune-sft", "eval-sft"):
        assert needle in text, needle
    # No broken image: any <img> is a data: URI; nothing loads from the network or disk.
    for tag, attrs, _ in dom.elements:
        if tag == "img":
            assert attrs.get("src", "").startswith("data:"), attrs
        for key in ("src", "href"):
            value = attrs.get(key)
            assert value is None or value.startswith(("data:", "#")), (tag, attrs)
    # The title was escaped: shown as text, not parsed as a tag.
    assert "Eval test report <sentiment & co>" in text
    assert not any(tag == "sentiment" for tag, _, _ in dom.elements)


def test_report_of_a_partial_run(tmp_path, tiny_model_dir):
    """Nothing but a run folder (and a metadata.json of another shape, no preprocess-sft manifest):
    every section says "not available", the stage still completes."""
    root = make_project(tmp_path / "proj", tiny_model_dir, prepared=False)
    (root / "prepared" / "sentiment").mkdir(parents=True)
    (root / "prepared" / "sentiment" / "metadata.json").write_text('{"rows": 3, "weird": {"histogram": "n/a"}}')
    (root / "outputs" / "r0").mkdir(parents=True)
    result = cli("report", root, "--run", "r0")
    assert result.code == 0, result.output
    html = (root / "outputs" / "r0" / "report.html").read_text(encoding="utf-8")
    assert html.count("not available") >= 5
    assert "<svg" not in html  # no data, no charts, no placeholders pretending otherwise
    manifest = json.loads((root / "logs" / "r0" / "report" / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    again = cli("report", root, "--run", "r0")
    assert "report: up to date, skipped (use --force to rerun)" in again.stdout


def test_hostile_text_is_escaped(tmp_path):
    from ftpipe.core.runs import Project, RunDir
    from ftpipe.eval.report import render

    evil = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    project = Project(tmp_path, tmp_path / "prepared", tmp_path / "outputs", tmp_path / "logs")
    html = render(
        title=evil, run=RunDir(project, "r1"), dataset=evil,
        manifests={evil: {"status": evil, "metrics": {"seconds": 1.5}, "versions": {evil: evil}, "outputs": [{"path": evil, "bytes": 1, "sha256": evil}]}},
        metadata={evil: evil, "token_length_histogram": {evil: 3}},
        scalars={evil: [(1, 2.0), (2, 1.0)], "train/loss": [(1, 2.0), (2, 1.0)]},
        eval_doc={"artifacts": {evil: {"status": evil, "perplexity": 3.0, "checks": [{"name": evil, "passed": False, "failures": [evil]}], "checks_total": 1, "checks_passed": 0}}},
        generations=[{"artifact": evil, "kind": "sample", "name": evil, "prompt": evil, "reference": evil, "output": evil}],
    )
    assert "<script" not in html and "<img" not in html
    assert "&lt;script&gt;" in html


@pytest.mark.parametrize("smoke, expected", [
    ({"artifact": "merged", "artifact_reason": "serve.artifact"}, "Served artifact: <b>merged</b> (serve.artifact)"),
    ({"artifact": "merged", "requested_artifact": "awq",
      "artifact_reason": "serve: outputs/r1/awq is a 4-bit weight-only (W4A16) model and this CPU cannot run it in vLLM: "
                         "vLLM's CPU kernels here (_C_AVX2.abi3.so) lack torch.ops._C.cpu_gemm_wna16"},
     "Served artifact: <b>merged</b> instead of serve.artifact <b>awq</b>: serve: outputs/r1/awq is a 4-bit weight-only "
     "(W4A16) model and this CPU cannot run it in vLLM: vLLM&#x27;s CPU kernels here (_C_AVX2.abi3.so) lack "
     "torch.ops._C.cpu_gemm_wna16"),
])
def test_the_report_says_which_artifact_was_served_and_why(tmp_path, smoke, expected):
    from ftpipe.core.runs import Project, RunDir
    from ftpipe.eval.report import render

    project = Project(tmp_path, tmp_path / "prepared", tmp_path / "outputs", tmp_path / "logs")
    smoke = {**smoke, "model": "r1", "url": "http://127.0.0.1:8765/v1",
             "prompt_checks": [{"name": "c1", "prompt": "p", "answer": "positive", "passed": True}]}
    html = render(title="t", run=RunDir(project, "r1"), dataset="d", manifests={}, metadata=None, scalars={},
                  eval_doc=None, generations=[], smoke=smoke)
    assert expected in html, html[html.find('id="served"'):][:1500]
    assert html.count('id="served-artifact"') == 1


def test_histogram_shapes():
    from ftpipe.eval.report import find_histograms

    meta = {
        "a": {"histogram": {"edges": [0, 10, 20], "counts": [1, 2]}},
        "b_hist": [{"lo": 0, "hi": 5, "count": 4}],
        "c": {"length_histogram": [[16, 3], [32, 5]]},
        "d": {"histogram": {"0-8": 2, "8-16": 1}},
        "e": {"histogram": {"bins": [1, 2], "counts": [3, 4]}},
        "f": {"histogram": "not a histogram"},
    }
    assert find_histograms(meta) == [
        ("a.histogram", [("0-10", 1.0), ("10-20", 2.0)]),
        ("b_hist", [("0-5", 4.0)]),
        ("c.length_histogram", [("16", 3.0), ("32", 5.0)]),
        ("d.histogram", [("0-8", 2.0), ("8-16", 1.0)]),
        ("e.histogram", [("1", 3.0), ("2", 4.0)]),
    ]


def _side_by_side_page(tmp_path, count=5, smoke=None, evil=""):
    from ftpipe.core.runs import Project, RunDir
    from ftpipe.eval.report import render

    project = Project(tmp_path, tmp_path / "prepared", tmp_path / "outputs", tmp_path / "logs")
    arts = ("base", "adapter", "awq")
    generations = [
        {"artifact": a, "kind": "check", "name": f"c{i}{evil}", "prompt": f"prompt {i}{evil}", "expect": {"exact": f"yes{evil}"},
         "output": f"{a} says {i}{evil}", "passed": a != "base"}
        for a in arts for i in range(3)
    ] + [{"artifact": "adapter", "kind": "general", "name": "g", "prompt": "p", "output": "not a check", "passed": True}]
    eval_doc = {"artifacts": {"base": {"status": "ok"}, "adapter": {"status": "ok"}, "merged": {"status": "skipped"},
                              "awq": {"status": "ok"}}}
    return render(title="t", run=RunDir(project, "r1"), dataset="d", manifests={}, metadata=None, scalars={},
                  eval_doc=eval_doc, generations=generations, smoke=smoke, side_by_side=count)


def test_answers_side_by_side(tmp_path):
    smoke = {"model": "r1", "artifact": "merged", "url": "http://127.0.0.1:8765/v1",
             "prompt_checks": [{"name": "c0", "prompt": "prompt 0", "answer": "served yes", "passed": True},
                               {"name": "c1", "prompt": "prompt 1", "answer": "served no", "passed": False}]}
    dom = Dom()
    dom.feed(_side_by_side_page(tmp_path, count=2, smoke=smoke))
    table = [e for e in dom.inside("table", id="side-by-side-table")]
    headers = [t for t, _, _ in table if t == "th"]
    assert len(headers) == 2 + 3 + 1 and len([t for t, _, _ in table if t == "tr"]) == 1 + 2  # report.side_by_side: 2
    html = _side_by_side_page(tmp_path, count=2, smoke=smoke)
    part = html[html.index('id="side-by-side"'):html.index("</table>", html.index('id="side-by-side-table"'))]
    assert "<th>served: r1, merged</th>" in part
    assert ('<td><b>c0</b><br>prompt 0</td><td>exact: yes</td>'
            '<td><span class="fail">fail</span> <code>base says 0</code></td>'
            '<td><span class="ok">pass</span> <code>adapter says 0</code></td>'
            '<td><span class="ok">pass</span> <code>awq says 0</code></td>'
            '<td><span class="ok">pass</span> <code>served yes</code></td>') in part
    assert '<span class="fail">fail</span> <code>served no</code>' in part
    assert "c2" not in part and "not a check" not in part
    assert "the first 2 of 3 prompt checks" in part
    assert 'id="side-by-side"' not in _side_by_side_page(tmp_path, count=0)


def test_side_by_side_is_escaped(tmp_path):
    evil = '<script>alert("x")</script>'
    html = _side_by_side_page(tmp_path, evil=evil)
    assert "<script" not in html and "&lt;script&gt;" in html[html.index('id="side-by-side"'):]


def test_side_by_side_has_a_column_per_served_model_name(tmp_path):
    """serve --artifact adapters serves <run>-base, <run>-sft, <run>-dpo: one served column each."""
    checks = [{"name": "c0", "answer": "x", "passed": True}]
    smoke = {"model": "r1-sft", "artifact": "adapters", "prompt_checks": checks,
             "models": {"r1-base": {"prompt_checks": [{"name": "c0", "answer": "y", "passed": False}]},
                        "r1-sft": {"prompt_checks": checks}}}
    html = _side_by_side_page(tmp_path, smoke=smoke)
    assert "<th>served: r1-base</th><th>served: r1-sft</th>" in html
