"""Stage `report`: one self-contained HTML page for a run (outputs/<run>/report.html).

Sections: data stats (prepared/<dataset>/metadata.json, token-length histogram), training curves
(TensorBoard event files under outputs/<run>/trainer_state/, read with TensorBoard's
EventAccumulator), the eval comparison across artifacts (outputs/<run>/eval/metrics.json and
generations.jsonl), SFT vs DPO (preference accuracy on held-out pairs and prompt-check pass rates of
base, SFT adapter and DPO adapter, in-process and served), artifact sizes, stage timings, versions and output hashes from every
logs/<run>/*/manifest.json and preprocess-sft's logs/_prepared/<dataset>/manifest.json. Plots are inline SVG; the page loads nothing from anywhere. Every
text is HTML-escaped; configs come from manifests, where secrets are already redacted. Whatever
is missing is shown as "not available": the report works on a partial run. `check(ctx)` names every
file the page shows (the inputs: the report is redone when one changes), `plan(ctx)` resolves them
with the title (`ReportPlan`), `run(ctx, plan)` reads and renders them.

    ftpipe report --config debug_config.yaml --run my-run
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import Any

from ftpipe.core.fsutil import atomic_write_text, read_json
from ftpipe.core.manifest import read_manifest
from ftpipe.core.runs import RunDir
from ftpipe.core.stage import StageContext, StageResult
from ftpipe.eval.svg import bar_chart, line_chart

log = logging.getLogger(__name__)

SMOKE_RESULTS = "results.json"  # written by ftpipe.serve.smoke_test into logs/<run>/smoke-test/
NA = '<p class="na">not available</p>'
ARTIFACT_DIRS = ("adapter", "dpo_adapter", "merged", "awq", "gguf")  # folders under outputs/<run>/
# The "SFT vs DPO" rows: eval-sft's artifact name -> label, and the suffix of its served name
# (serve --artifact adapters serves <run>-base, <run>-sft, <run>-dpo).
PREFERENCE_ROWS = (("base", "base", "base"), ("adapter", "SFT (adapter)", "sft"), ("dpo_adapter", "DPO (dpo_adapter)", "dpo"))


@dataclass(frozen=True)
class ReportPlan:
    """What the page shows and where it goes: the files it reads, all resolved before rendering."""

    title: str  # report.title, else "ftpipe run <run>"
    page: Path  # outputs/<run>/report.html
    dataset: str  # data.name
    # (stage, manifest path): preprocess-sft's of the dataset, then every stage's of the run but ours
    manifests: tuple[tuple[str, Path], ...]
    metadata: Path  # prepared/<dataset>/metadata.json
    eval_metrics: Path  # outputs/<run>/eval/metrics.json
    generations: Path  # outputs/<run>/eval/generations.jsonl
    generations_shown: int  # report.generations_shown
    side_by_side: int  # report.side_by_side
    trainer_state: Path  # TensorBoard event files under it
    smoke_results: Path  # logs/<run>/smoke-test/results.json


def check(ctx: StageContext) -> dict[str, Path]:
    """The report reads whatever the run has; every file it shows is an input (rerun when one changes)."""
    run, project, dataset = ctx.run, ctx.project, ctx.config.data.name
    inputs: dict[str, Path] = {
        f"manifest:{s}": run.manifest_path(s) for s in run.stages() if s != ctx.stage
    }
    inputs["manifest:preprocess-sft"] = project.prepared_log_dir(dataset) / "manifest.json"
    inputs["metadata"] = project.prepared_dir(dataset) / "metadata.json"
    inputs["eval_metrics"] = run.eval / "metrics.json"
    inputs["generations"] = run.eval / "generations.jsonl"
    inputs["trainer_state"] = run.trainer_state
    inputs["smoke_results"] = run.log_dir("smoke-test") / SMOKE_RESULTS
    return inputs


def plan(ctx: StageContext) -> ReportPlan:
    """The page's title and path, and the files it reads (a missing one shows as "not available")."""
    run, project, cfg, dataset = ctx.run, ctx.project, ctx.config.report, ctx.config.data.name
    manifests = (("preprocess-sft", project.prepared_log_dir(dataset) / "manifest.json"),
                 *((s, run.manifest_path(s)) for s in run.stages() if s != ctx.stage))
    return ReportPlan(
        title=cfg.title or f"ftpipe run {run.name}", page=run.report, dataset=dataset, manifests=manifests,
        metadata=project.prepared_dir(dataset) / "metadata.json", eval_metrics=run.eval / "metrics.json",
        generations=run.eval / "generations.jsonl", generations_shown=cfg.generations_shown,
        side_by_side=cfg.side_by_side, trainer_state=run.trainer_state, smoke_results=run.log_dir("smoke-test") / SMOKE_RESULTS,
    )


def run(ctx: StageContext, plan: ReportPlan) -> StageResult:
    """Collect everything the page shows, render it, write report.html atomically."""
    manifests = _manifests(plan.manifests)
    metadata = read_json(plan.metadata)
    scalars = read_scalars(plan.trainer_state)
    eval_doc = read_json(plan.eval_metrics)
    generations = _read_jsonl(plan.generations)
    smoke = read_json(plan.smoke_results)
    page = render(
        title=plan.title,
        run=ctx.run,
        dataset=plan.dataset,
        manifests=manifests,
        metadata=metadata if isinstance(metadata, dict) else None,
        scalars=scalars,
        eval_doc=eval_doc if isinstance(eval_doc, dict) else None,
        generations=generations,
        generations_shown=plan.generations_shown,
        side_by_side=plan.side_by_side,
        smoke=smoke if isinstance(smoke, dict) else None,
    )
    atomic_write_text(plan.page, page)
    os.chmod(plan.page, 0o644)  # a page to share: the atomic temp file is created owner-only
    log.info("report: %s (%d bytes)", ctx.project.rel(plan.page), len(page.encode()))
    return StageResult(
        outputs=[plan.page],
        metrics={"stages_shown": len(manifests), "scalar_tags": len(scalars), "bytes": len(page.encode())},
        summary=f"report: {ctx.project.rel(plan.page)}",
    )


def _manifests(paths: tuple[tuple[str, Path], ...]) -> dict[str, dict[str, Any]]:
    """The manifests that exist of (stage, manifest path), by stage, in run order."""
    found: dict[str, dict[str, Any]] = {}
    for stage, path in paths:
        if manifest := read_manifest(path):
            found[stage] = manifest
    return dict(sorted(found.items(), key=lambda item: str(item[1].get("started_at") or "")))  # run order


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag in the TensorBoard event files under `folder`: tag -> [(step, value)].

    Several event folders (e.g. a resumed run) are merged; for a step logged twice the later
    wall time wins.
    """
    if not folder.is_dir():
        return {}
    dirs = sorted({p.parent for p in folder.rglob("events.out.tfevents.*") if p.is_file()})
    if not dirs:
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    merged: dict[str, dict[int, tuple[float, float]]] = {}
    for d in dirs:
        acc = EventAccumulator(str(d), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            points = merged.setdefault(tag, {})
            for ev in acc.Scalars(tag):
                if ev.step not in points or points[ev.step][0] <= ev.wall_time:
                    points[ev.step] = (ev.wall_time, float(ev.value))
    return {tag: sorted((step, v) for step, (_, v) in pts.items()) for tag, pts in merged.items()}


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict):
                    rows.append(row)
    except (FileNotFoundError, UnicodeDecodeError):
        return []
    return rows


# ---------------------------------------------------------------------------------------- render

CSS = """
body{font-family:-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1180px;color:#222;background:#fafafa}
h1{font-size:24px;margin-bottom:4px}h2{font-size:19px;border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:32px}
h3{font-size:15px;margin:18px 0 6px}.meta{color:#666;font-size:13px}
table{border-collapse:collapse;margin:8px 0;font-size:13px;background:#fff}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}th{background:#f0f0f0}
td.num{text-align:right;font-variant-numeric:tabular-nums}.ok{color:#11772d;font-weight:bold}
.fail{color:#b3261e;font-weight:bold}.skip{color:#8a6d00}.warn{color:#8a6d00}.na{color:#888;font-style:italic}
.charts{display:flex;flex-wrap:wrap;gap:12px}.charts svg{border:1px solid #ddd;background:#fff}
code,.mono{font-family:ui-monospace,monospace;font-size:12px;word-break:break-all}
details{margin:6px 0}summary{cursor:pointer}
"""


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def _num(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or value is None:
        return _e("-" if value is None else value)
    if isinstance(value, float):
        return _e(f"{value:.{digits}g}") if math.isfinite(value) else _e(value)
    return _e(value)


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{n} B"


def _table(headers: list[str], rows: list[list[str]], cls: str = "") -> str:
    """Rows are already-escaped HTML cells."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" if not c.startswith("<td") else c for c in r) + "</tr>" for r in rows)
    return f'<table class="{_e(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def render(
    *,
    title: str,
    run: RunDir,
    dataset: str,
    manifests: dict[str, dict[str, Any]],
    metadata: dict[str, Any] | None,
    scalars: dict[str, list[tuple[int, float]]],
    eval_doc: dict[str, Any] | None,
    generations: list[dict[str, Any]],
    generations_shown: int = 20,
    smoke: dict[str, Any] | None = None,
    side_by_side: int = 5,
) -> str:
    """The whole page as one HTML string (inline CSS and SVG, nothing external)."""
    generated = datetime.now(timezone.utc).isoformat(timespec="seconds")
    sections = [
        _section_overview(manifests),
        _section_data(dataset, metadata),
        _section_training(scalars, manifests.get("finetune-sft")),
        _section_eval(eval_doc, generations, generations_shown),
        _section_side_by_side(eval_doc, generations, smoke, side_by_side),
        _section_sft_vs_dpo(eval_doc, smoke),
        _section_served(smoke, eval_doc),
        _section_sizes(run, manifests),
        _section_versions(manifests),
        _section_hashes(manifests),
    ]
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width\"><title>{_e(title)}</title>"
        f"<style>{CSS}</style></head><body>"
        f"<h1>{_e(title)}</h1><p class=\"meta\">run <code>{_e(run.name)}</code> · generated {_e(generated)} "
        f"by ftpipe · {len(manifests)} stage manifest(s)</p>"
        + "".join(sections)
        + "</body></html>\n"
    )


def _section_overview(manifests: dict[str, dict[str, Any]]) -> str:
    if not manifests:
        return "<h2 id=\"stages\">Stages</h2>" + NA
    rows = []
    for stage, m in manifests.items():
        status = m.get("status", "?")
        cls = {"completed": "ok", "failed": "fail"}.get(status, "skip")
        metrics = m.get("metrics") or {}
        env = m.get("environment") or {}
        rows.append([
            _e(stage), f'<span class="{cls}">{_e(status)}</span>', _e(m.get("started_at") or "-"),
            _e(m.get("finished_at") or "-"), f'<td class="num">{_num(metrics.get("seconds"))}</td>',
            _e(env.get("stage_environment") or env.get("name") or "-"),
            f'<span class="mono">{_e((m.get("config_hash") or "-")[:12])}</span>',
            _e(m.get("error") or ""),
        ])
    return "<h2 id=\"stages\">Stages and timings</h2>" + _table(
        ["stage", "status", "started", "finished", "seconds", "environment", "config hash", "error"], rows
    )


def _flatten(data: Any, prefix: str = "", depth: int = 0) -> list[tuple[str, Any]]:
    """Scalar leaves of a JSON document (short numeric lists joined), for a key/value table."""
    out: list[tuple[str, Any]] = []
    if isinstance(data, dict):
        for k, v in data.items():
            if "hist" in str(k).lower():
                continue  # drawn as a chart
            out.extend(_flatten(v, f"{prefix}{k}." if depth < 4 else prefix, depth + 1) if isinstance(v, (dict, list)) else [(f"{prefix}{k}", v)])
    elif isinstance(data, list):
        if len(data) <= 12 and all(isinstance(v, (int, float, str)) for v in data):
            out.append((prefix.rstrip("."), ", ".join(str(v) for v in data)))
        else:
            out.append((prefix.rstrip("."), f"[{len(data)} items]"))
    return out


def find_histograms(data: Any, path: str = "") -> list[tuple[str, list[tuple[str, float]]]]:
    """Histograms anywhere in `data` under a key containing "hist", as (name, [(label, count)]).

    Accepted shapes: {edges|bins|bin_edges, counts}; [{lo|start|min, hi|end|max, count}];
    [[edge, count]]; {label: count}. Anything else is ignored.
    """
    found: list[tuple[str, list[tuple[str, float]]]] = []
    if isinstance(data, dict):
        for k, v in data.items():
            name = f"{path}.{k}" if path else str(k)
            if "hist" in str(k).lower():
                bars = _bars(v)
                if bars:
                    found.append((name, bars))
                    continue
            if isinstance(v, (dict, list)):
                found.extend(find_histograms(v, name))
    return found


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _bars(v: Any) -> list[tuple[str, float]] | None:
    if isinstance(v, dict):
        counts = v.get("counts")
        edges = next((v[k] for k in ("edges", "bin_edges", "bins", "buckets") if isinstance(v.get(k), list)), None)
        if isinstance(counts, list) and edges and all(_is_num(c) for c in counts):
            if len(edges) == len(counts) + 1:
                return [(f"{_fmt_edge(edges[i])}-{_fmt_edge(edges[i + 1])}", float(c)) for i, c in enumerate(counts)]
            if len(edges) == len(counts):
                return [(_fmt_edge(e), float(c)) for e, c in zip(edges, counts)]
            return None
        if v and all(_is_num(c) for c in v.values()):
            return [(str(k), float(c)) for k, c in v.items()]
        return None
    if isinstance(v, list) and v:
        if all(isinstance(b, dict) for b in v):
            bars = []
            for b in v:
                lo = next((b[k] for k in ("lo", "start", "min", "low", "left") if k in b), None)
                hi = next((b[k] for k in ("hi", "end", "max", "high", "right") if k in b), None)
                c = b.get("count", b.get("n"))
                if not _is_num(c):
                    return None
                label = f"{_fmt_edge(lo)}-{_fmt_edge(hi)}" if lo is not None and hi is not None else str(lo if lo is not None else len(bars))
                bars.append((label, float(c)))
            return bars
        if all(isinstance(b, (list, tuple)) and len(b) == 2 and _is_num(b[1]) for b in v):
            return [(_fmt_edge(b[0]), float(b[1])) for b in v]
    return None


def _fmt_edge(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _section_data(dataset: str, metadata: dict[str, Any] | None) -> str:
    head = f'<h2 id="data">Data: <code>{_e(dataset)}</code></h2>'
    if metadata is None:
        return head + NA
    def rows(items: list[tuple[str, Any]]) -> list[list[str]]:
        return [[_e(k), f'<td class="num">{_num(v)}</td>' if _is_num(v) else _e("-" if v is None else v)] for k, v in items]

    everything = _flatten(metadata)
    # Counts and token lengths up front (the keys preprocess-sft writes); everything else folded.
    key = [(k, v) for k, v in everything if k.split(".")[0] in ("counts", "tokens", "rows", "format", "dataset")]
    hists = find_histograms(metadata)
    charts = "".join(bar_chart(bars, f"token lengths: {name}", "rows") for name, bars in hists)
    return (
        head + '<div class="charts"><div><h3>Counts and token lengths</h3>'
        + (_table(["key", "value"], rows(key)) if key else NA)
        + "</div><div><h3>Token-length histogram</h3>" + (charts or NA) + "</div></div>"
        + "<details><summary>all of metadata.json</summary>"
        + (_table(["key", "value"], rows(everything)) if everything else NA) + "</details>"
    )


def _section_training(scalars: dict[str, list[tuple[int, float]]], finetune: dict[str, Any] | None) -> str:
    head = '<h2 id="training">Training</h2>'
    if not scalars:
        body = NA
    else:
        loss = {t: scalars[t] for t in ("train/loss", "eval/loss") if t in scalars}
        loss.update({t: v for t, v in scalars.items() if t.endswith("/loss") and t not in loss})
        lr = {t: v for t, v in scalars.items() if "learning_rate" in t or t.endswith("/lr")}
        charts = [line_chart(loss, "loss", "step", "loss")] if loss else []
        if lr:
            charts.append(line_chart(lr, "learning rate", "step", "lr"))
        body = f'<div class="charts" id="loss-curves">{"".join(charts) or NA}</div>'
        rows = [
            [_e(t), f'<td class="num">{len(v)}</td>', f'<td class="num">{_num(v[0][1])}</td>', f'<td class="num">{_num(v[-1][1])}</td>', f'<td class="num">{v[-1][0]}</td>']
            for t, v in sorted(scalars.items())
        ]
        body += "<details><summary>all TensorBoard scalars</summary>" + _table(["tag", "points", "first", "last", "last step"], rows) + "</details>"
    if finetune and finetune.get("metrics"):
        # One perplexity per artifact on the page: eval-sft's (ftpipe.handoff.measure). TRL's
        # eval_perplexity (exp of its eval loss, other tokens and packing) stays in the manifest.
        rows = [[_e(k), f'<td class="num">{_num(v)}</td>'] for k, v in finetune["metrics"].items()
                if not isinstance(v, (dict, list)) and k != "eval_perplexity"]
        body += "<h3>finetune-sft metrics</h3>" + _table(["metric", "value"], rows)
    return head + body


def _section_eval(doc: dict[str, Any] | None, generations: list[dict[str, Any]], shown: int) -> str:
    head = '<h2 id="eval">Evaluation: base vs tuned vs merged vs AWQ vs GGUF</h2>'
    artifacts = (doc or {}).get("artifacts")
    if not isinstance(artifacts, dict) or not artifacts:
        return head + NA
    rows = []
    for name, a in artifacts.items():
        if not isinstance(a, dict):
            continue
        status = a.get("status", "?")
        cls = {"ok": "ok", "failed": "fail"}.get(status, "skip")
        checks = f"{a['checks_passed']}/{a['checks_total']}" if a.get("checks_total") else "-"
        general = f"{a['general_passed']}/{a['general_total']}" if a.get("general_total") else "-"
        kept = a.get("general_kept")
        delta = a.get("text_perplexity_delta_vs_merged")
        rows.append([
            _e(name), f'<span class="{cls}">{_e(status)}</span>',
            f'<td class="num">{_num(a.get("perplexity"))}</td>', f'<td class="num">{_num(a.get("assistant_tokens"))}</td>',
            f'<td class="num">{_num(a.get("text_perplexity"))}</td>',
            f'<td class="num">{_e(f"{delta:+.1%}") if _is_num(delta) else "-"}</td>',
            f'<td class="num">{_e(checks)}</td>', f'<td class="num">{_e(general)}</td>',
            f'<td class="num">{_e(f"{kept:.0%}") if _is_num(kept) else "-"}</td>',
            f'<td class="num">{_num(a.get("seconds"))}</td>',
            _e(a.get("environment") or "-"), _e(a.get("reason") or a.get("error") or ""),
        ])
    body = _table(
        ["artifact", "status", "perplexity (val, assistant tokens)", "tokens", "perplexity (held-out text)",
         "text perplexity vs merged", "checks passed", "general checks passed",
         "general kept (of base's passes)", "seconds", "environment", "note"],
        rows, "comparison",
    )
    body = body.replace("<table", '<table id="comparison"', 1)
    bounds = [b for b in doc.get("thresholds") or [] if isinstance(b, dict)]
    if bounds:
        rows = [[_e(b.get("key", "")), _e(b.get("artifact") or "-"), f'<td class="num">{_num(b.get("value"))}</td>',
                 f'<td class="num">{_num(b.get("bound"))}</td>',
                 '<span class="ok">pass</span>' if b.get("passed") else '<span class="fail">fail</span>'] for b in bounds]
        body += "<h3>Bounds the run must pass</h3>" + _table(["key", "artifact", "value", "bound", "result"], rows, "bounds")
    ppl = [(n, a["perplexity"]) for n, a in artifacts.items() if isinstance(a, dict) and _is_num(a.get("perplexity"))]
    if ppl:
        body += f'<div class="charts">{bar_chart(ppl, "perplexity by artifact (lower is better)", "perplexity", 480, 240)}</div>'
    body += _check_matrix(artifacts, generations, "checks", "check", "Prompt checks")
    body += _check_matrix(artifacts, generations, "general", "general", "General-ability checks (eval.general_file)")
    samples = [g for g in generations if g.get("kind") == "sample"]
    if samples:
        per: dict[str, int] = {}
        rows = []
        for g in samples:
            a = str(g.get("artifact"))
            per[a] = per.get(a, 0) + 1
            if per[a] > shown:
                continue
            rows.append([_e(a), _e(g.get("name", "")), _e(g.get("prompt", "")), _e(g.get("reference", "")),
                         f'<code>{_e(g.get("output", ""))}</code>', _e("yes" if g.get("stopped") else "no")])
        body += "<h3>Sample generations (greedy)</h3>" + _table(["artifact", "row", "prompt", "reference", "output", "stopped"], rows)
    if doc.get("lm_eval"):
        body += "<h3>lm-evaluation-harness</h3><pre class=\"mono\">" + _e(json.dumps(doc["lm_eval"], indent=1)[:20000]) + "</pre>"
    return head + body


def _check_matrix(artifacts: dict[str, Any], generations: list[dict[str, Any]], key: str, kind: str, title: str) -> str:
    """Check x artifact: pass/fail, the output and the failures, for the checks under `key` of each
    artifact (`checks` or `general`) and their generations rows of `kind`."""
    names = [n for n, a in artifacts.items() if isinstance(a, dict) and a.get(key)]
    if not names:
        return ""
    check_names: list[str] = []
    result: dict[tuple[str, str], dict[str, Any]] = {}
    for n in names:
        for c in artifacts[n][key]:
            if c.get("name") not in check_names:
                check_names.append(c.get("name"))
            result[(c.get("name"), n)] = c
    outputs = {(g.get("name"), g.get("artifact")): g.get("output", "") for g in generations if g.get("kind") == kind}
    rows = []
    for cn in check_names:
        row = [_e(cn)]
        for n in names:
            c = result.get((cn, n))
            if c is None:
                row.append("-")
                continue
            mark = '<span class="ok">pass</span>' if c.get("passed") else '<span class="fail">fail</span>'
            out = outputs.get((cn, n))
            row.append(mark + (f' <code>{_e(out[:80])}</code>' if out is not None else "")
                       + ("".join(f"<br><small>{_e(f)}</small>" for f in c.get("failures") or [])))
        rows.append(row)
    return f"<h3>{_e(title)}</h3>" + _table(["check", *names], rows)


def _expectation(expect: Any) -> str:
    """A check's `expect` mapping as one short line (`exact: positive; must_stop: true`): texts as
    written (an expected JSON answer stays readable), lists joined, other values as JSON."""
    if not isinstance(expect, dict) or not expect:
        return "-"

    def shown(v: Any) -> str:
        if isinstance(v, str):
            return v
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            return " | ".join(v)
        return json.dumps(v, ensure_ascii=False)

    return "; ".join(f"{k}: {shown(v)}" for k, v in expect.items())


def _verdict(passed: Any, answer: Any) -> str:
    mark = '<span class="ok">pass</span>' if passed else '<span class="fail">fail</span>'
    return f'{mark} <code>{_e(str(answer)[:200])}</code>'


def _served_checks(smoke: dict[str, Any] | None) -> list[tuple[str, dict[str, dict[str, Any]]]]:
    """(column label, check name -> result) of each served model name that answered the prompt checks:
    every name of results.json's `models` (serve --artifact adapters serves several), else the one model."""
    if not smoke:
        return []
    models = smoke.get("models") if isinstance(smoke.get("models"), dict) else {}
    found = [(str(n), m.get("prompt_checks")) for n, m in models.items() if isinstance(m, dict)]
    if not found:
        found = [(str(smoke.get("model") or "served"), smoke.get("prompt_checks"))]
    artifact = f", {smoke['artifact']}" if smoke.get("artifact") and len(found) == 1 else ""
    return [(f"served: {n}{artifact}", {c.get("name"): c for c in checks if isinstance(c, dict)})
            for n, checks in found if isinstance(checks, list) and checks]


def _section_side_by_side(eval_doc: dict[str, Any] | None, generations: list[dict[str, Any]],
                          smoke: dict[str, Any] | None, count: int) -> str:
    """The first `count` prompt checks, one row each: the prompt and what is expected, then each
    artifact's greedy answer (eval-sft's generations.jsonl) and each served model's answer
    (smoke-test's results.json), each marked pass/fail."""
    if count <= 0:
        return ""
    head = '<h2 id="side-by-side">Answers side by side (held-out prompt checks)</h2>'
    answers: dict[tuple[str, str], dict[str, Any]] = {}
    names: list[str] = []
    prompts: dict[str, dict[str, Any]] = {}
    for g in generations:
        if g.get("kind") != "check":
            continue
        name, artifact = str(g.get("name")), str(g.get("artifact"))
        answers[(name, artifact)] = g
        prompts.setdefault(name, g)
        if name not in names:
            names.append(name)
    served = _served_checks(smoke)
    for _, checks in served:
        for name, c in checks.items():
            prompts.setdefault(str(name), c)
            if str(name) not in names:
                names.append(str(name))
    if not names:
        return head + '<p class="na">no prompt checks answered in this run (eval.prompts_file, ftpipe eval-sft)</p>'
    order = list(((eval_doc or {}).get("artifacts") or {}))
    artifacts = sorted({a for _, a in answers}, key=lambda a: order.index(a) if a in order else len(order))
    rows = []
    for name in names[:count]:
        first = prompts[name]
        row = [f"<b>{_e(name)}</b><br>{_e(first.get('prompt', ''))}", _e(_expectation(first.get("expect")))]
        for artifact in artifacts:
            g = answers.get((name, artifact))
            row.append(_verdict(g.get("passed"), g.get("output", "")) if g else "-")
        for _, checks in served:
            c = checks.get(name)
            row.append(_verdict(c.get("passed"), c.get("answer", "")) if c else "-")
        rows.append(row)
    note = f'<p class="meta">the first {len(rows)} of {len(names)} prompt checks (report.side_by_side)</p>'
    return head + note + _table(["check / prompt", "expected", *artifacts, *(label for label, _ in served)],
                                rows, "side-by-side").replace("<table", '<table id="side-by-side-table"', 1)


def _section_served(smoke: dict[str, Any] | None, eval_doc: dict[str, Any] | None) -> str:
    """Held-out prompt checks answered by the served model (smoke-test), next to eval-sft's
    in-process accuracy of each artifact - the base model's row is the baseline."""
    head = '<h2 id="served">Served model: held-out prompt checks over the OpenAI API</h2>' + _served_artifact(smoke)
    checks = (smoke or {}).get("prompt_checks") or []
    if not checks:
        return head + '<p class="na">no smoke-test with prompt checks in this run (ftpipe serve + ftpipe smoke-test)</p>'
    rows = []
    for name, a in ((eval_doc or {}).get("artifacts") or {}).items():
        if isinstance(a, dict) and a.get("checks_total"):
            acc = a["checks_passed"] / a["checks_total"]
            rows.append([_e(f"{name} (eval-sft, in-process)"), f'<td class="num">{a["checks_passed"]}/{a["checks_total"]}</td>',
                         f'<td class="num">{acc:.0%}</td>'])
    passed = sum(bool(c.get("passed")) for c in checks)
    rows.append([_e(f"{smoke.get('model')} ({smoke.get('artifact')}, served at {smoke.get('url')})"),
                 f'<td class="num">{passed}/{len(checks)}</td>', f'<td class="num" id="served-accuracy">{passed / len(checks):.0%}</td>'])
    body = _table(["model", "checks passed", "accuracy"], rows, "served")
    answers = [[_e(c.get("name", "")), _e(c.get("prompt", "")), f'<code>{_e(str(c.get("answer", ""))[:80])}</code>',
                '<span class="ok">pass</span>' if c.get("passed") else '<span class="fail">fail</span>'] for c in checks]
    return head + body + "<h3>Served answers</h3>" + _table(["check", "prompt", "answer", "result"], answers)


def _served_artifact(smoke: dict[str, Any] | None) -> str:
    """Which artifact the server served and why: serve.artifact, or what replaced it (AWQ on a CPU
    whose vLLM has no W4A16 kernel, `ftpipe run` serving the merged model instead)."""
    if not smoke or not smoke.get("artifact"):
        return ""
    artifact, requested = str(smoke["artifact"]), smoke.get("requested_artifact")
    if requested and requested != artifact:
        return (f'<p id="served-artifact" class="warn">Served artifact: <b>{_e(artifact)}</b> instead of '
                f'serve.artifact <b>{_e(str(requested))}</b>: {_e(str(smoke.get("artifact_reason") or "reason not recorded"))}</p>')
    return f'<p id="served-artifact">Served artifact: <b>{_e(artifact)}</b> (serve.artifact)</p>'


def _rate(passed: Any, total: Any) -> str:
    return f"{passed}/{total} ({passed / total:.0%})" if _is_num(passed) and _is_num(total) and total else "-"


def _section_sft_vs_dpo(eval_doc: dict[str, Any] | None, smoke: dict[str, Any] | None) -> str:
    """base, SFT and DPO side by side: preference accuracy and margin on the held-out pairs, the
    prompt-check pass rate in-process (eval-sft) and served (smoke-test of `serve --artifact adapters`).
    Shown when eval-sft evaluated the DPO adapter or scored preference pairs."""
    head = '<h2 id="sft-vs-dpo">SFT vs DPO: preference accuracy on held-out pairs</h2>'
    artifacts = (eval_doc or {}).get("artifacts") or {}
    preference = (eval_doc or {}).get("preference") or {}
    dpo = artifacts.get("dpo_adapter") if isinstance(artifacts.get("dpo_adapter"), dict) else {}
    if dpo.get("status") != "ok" and not preference.get("pairs"):
        return ""
    served = (smoke or {}).get("models") or {}
    served_by_suffix = {str(name).rsplit("-", 1)[-1]: (name, m) for name, m in served.items() if isinstance(m, dict)}
    rows = []
    for name, label, suffix in PREFERENCE_ROWS:
        a = artifacts.get(name) if isinstance(artifacts.get(name), dict) else {}
        acc = a.get("preference_accuracy")
        served_name, m = served_by_suffix.get(suffix, (None, {}))
        checks = m.get("prompt_checks") or []
        rows.append([
            _e(label),
            f'<td class="num" id="pref-acc-{_e(name)}">{_e(f"{acc:.0%}") if _is_num(acc) else "-"}</td>',
            f'<td class="num">{_num(a.get("preference_margin"))}</td>',
            f'<td class="num">{_num(a.get("preference_pairs"))}</td>',
            f'<td class="num">{_e(_rate(a.get("checks_passed"), a.get("checks_total")))}</td>',
            f'<td class="num">{_e(_rate(sum(bool(c.get("passed")) for c in checks), len(checks)))}</td>',
            _e(served_name or "-") if checks else "-",
            _e(a.get("reason") or a.get("error") or ""),
        ])
    note = ""
    if preference.get("reason"):
        note = f'<p class="na">preference accuracy: - ({_e(preference["reason"])})</p>'
    elif preference.get("pairs"):
        note = (f'<p class="meta">{_e(preference["pairs"])} held-out pairs of <code>{_e(preference.get("val_file"))}</code>: '
                "accuracy = share of pairs whose chosen answer has the higher summed log-prob given the prompt; "
                "margin = mean of (chosen - rejected) log-prob, nats.</p>")
    return head + _table(["model", "preference accuracy", "mean margin", "pairs", "prompt checks (eval-sft)",
                          "prompt checks (served)", "served as", "note"], rows, "sft-vs-dpo") + note


def _folder_bytes(folder: Path) -> int | None:
    if not folder.is_dir():
        return None
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _section_sizes(run: RunDir, manifests: dict[str, dict[str, Any]]) -> str:
    rows = []
    for name in ARTIFACT_DIRS:
        size = _folder_bytes(run.path / name)
        if size is not None:
            rows.append([_e(name), f'<td class="num">{_e(_bytes(size))}</td>', f'<td class="num">{size}</td>'])
    art = _table(["artifact", "size", "bytes"], rows) if rows else NA
    rows = []
    for stage, m in manifests.items():
        outs = m.get("outputs") or []
        total = sum(o.get("bytes", 0) for o in outs if isinstance(o, dict))
        rows.append([_e(stage), f'<td class="num">{len(outs)}</td>', f'<td class="num">{_e(_bytes(total))}</td>'])
    per_stage = _table(["stage", "output files", "total size"], rows) if rows else NA
    return '<h2 id="sizes">Sizes</h2>' + art + "<h3>Outputs recorded per stage</h3>" + per_stage


def _section_versions(manifests: dict[str, dict[str, Any]]) -> str:
    if not manifests:
        return '<h2 id="versions">Versions</h2>' + NA
    stages = list(manifests)
    packages: list[str] = []
    for m in manifests.values():
        for p in m.get("versions") or {}:
            if p not in packages:
                packages.append(p)
    rows = [[_e(p), *[_e((manifests[s].get("versions") or {}).get(p, "-")) for s in stages]] for p in packages]
    return '<h2 id="versions">Versions</h2>' + _table(["package", *stages], rows)


def _section_hashes(manifests: dict[str, dict[str, Any]], limit: int = 200) -> str:
    if not manifests:
        return '<h2 id="hashes">Hashes</h2>' + NA
    parts = ['<h2 id="hashes">Inputs and outputs (sha256)</h2>']
    for stage, m in manifests.items():
        rows = []
        for name, rec in (m.get("inputs") or {}).items():
            if isinstance(rec, dict):
                digest = rec.get("sha256") or rec.get("manifest_digest") or rec.get("tree_digest") or ("missing" if rec.get("missing") else "-")
                rows.append([_e("input " + str(name)), f'<span class="mono">{_e(rec.get("path", ""))}</span>', "-", f'<span class="mono">{_e(digest)}</span>'])
        outs = m.get("outputs") or []
        for rec in outs[:limit]:
            if isinstance(rec, dict):
                rows.append(["output", f'<span class="mono">{_e(rec.get("path", ""))}</span>', f'<td class="num">{_num(rec.get("bytes"))}</td>', f'<span class="mono">{_e(rec.get("sha256", ""))}</span>'])
        more = f"<p class=\"meta\">… and {len(outs) - limit} more outputs</p>" if len(outs) > limit else ""
        parts.append(
            f"<details><summary>{_e(stage)}: {len(m.get('inputs') or {})} inputs, {len(outs)} outputs, "
            f"config hash <span class=\"mono\">{_e(m.get('config_hash', '-'))}</span></summary>"
            + (_table(["kind", "path", "bytes", "sha256 / digest"], rows) if rows else NA) + more + "</details>"
        )
    return "".join(parts)
