"""Small inline-SVG charts for the report (no matplotlib, no network): lines and bars.

Every text that reaches the SVG goes through `html.escape`.
"""

from __future__ import annotations

import math
from html import escape

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")
FONT = 'font-family="sans-serif" font-size="11"'


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    ticks, v = [], first
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 12))
        v += step
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.1e}"
    return f"{v:.4g}"


def _open(title: str, width: int, height: int) -> list[str]:
    """The opening of every chart: the <svg> element, a white background and the title."""
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
        f'<text x="{width / 2}" y="18" text-anchor="middle" font-family="sans-serif" font-size="13" '
        f'font-weight="bold">{escape(title)}</text>',
    ]


def line_chart(
    series: dict[str, list[tuple[float, float]]],
    title: str,
    x_label: str = "step",
    y_label: str = "",
    width: int = 570,
    height: int = 280,
) -> str:
    """An SVG line chart: one `<path>` per series, axes with ticks, a legend.

    Args:
        series: name -> [(x, y)], each sorted by x; non-finite points are dropped.
    """
    clean = {k: [(x, y) for x, y in v if math.isfinite(x) and math.isfinite(y)] for k, v in series.items()}
    clean = {k: v for k, v in clean.items() if v}
    left, right, top, bottom = 64, 16, 28, 40
    pw, ph = width - left - right, height - top - bottom
    parts = _open(title, width, height)
    if not clean:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" {FONT}>no data</text></svg>')
        return "".join(parts)
    xs = [x for v in clean.values() for x, _ in v]
    ys = [y for v in clean.values() for _, y in v]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    pad = (y1 - y0) * 0.05 or abs(y0) * 0.05 or 1.0
    y0, y1 = y0 - pad, y1 + pad

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + ph - (y - y0) / (y1 - y0) * ph

    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
    for t in _ticks(y0, y1):
        if y0 <= t <= y1:
            parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#eee"/>')
            parts.append(f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end" {FONT}>{_fmt(t)}</text>')
    for t in _ticks(x0, x1):
        if x0 <= t <= x1:
            parts.append(f'<text x="{sx(t):.1f}" y="{top + ph + 16}" text-anchor="middle" {FONT}>{_fmt(t)}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle" {FONT}>{escape(x_label)}</text>')
    if y_label:
        parts.append(
            f'<text x="14" y="{top + ph / 2}" text-anchor="middle" {FONT} '
            f'transform="rotate(-90 14 {top + ph / 2})">{escape(y_label)}</text>'
        )
    for i, (name, points) in enumerate(clean.items()):
        color = COLORS[i % len(COLORS)]
        d = " ".join(f"{'M' if j == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for j, (x, y) in enumerate(points))
        parts.append(f'<path class="series" data-series="{escape(name)}" d="{d}" fill="none" stroke="{color}" stroke-width="2"/>')
        if len(points) == 1:
            x, y = points[0]
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}"/>')
        ly = top + 14 + 16 * i
        parts.append(f'<line x1="{left + pw - 130}" x2="{left + pw - 110}" y1="{ly - 4}" y2="{ly - 4}" stroke="{color}" stroke-width="2"/>')
        parts.append(f'<text x="{left + pw - 104}" y="{ly}" {FONT}>{escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(bars: list[tuple[str, float]], title: str, y_label: str = "", width: int = 570, height: int = 260) -> str:
    """An SVG bar chart (e.g. a histogram): one `<rect>` per (label, value)."""
    left, right, top, bottom = 56, 12, 28, 52
    pw, ph = width - left - right, height - top - bottom
    parts = _open(title, width, height)
    values = [v for _, v in bars if math.isfinite(v)]
    if not bars or not values:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" {FONT}>no data</text></svg>')
        return "".join(parts)
    top_v = max(max(values), 1e-12)
    slot = pw / len(bars)
    every = max(1, math.ceil(len(bars) / 12))  # at most ~12 labels on the x axis
    parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{top + ph}" y2="{top + ph}" stroke="#999"/>')
    for t in _ticks(0, top_v, 4):
        y = top + ph - t / top_v * ph
        if t <= top_v:
            parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
            parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" {FONT}>{_fmt(t)}</text>')
    for i, (label, value) in enumerate(bars):
        h = (value / top_v * ph) if math.isfinite(value) else 0
        x = left + i * slot
        parts.append(
            f'<rect class="bar" x="{x + slot * 0.1:.1f}" y="{top + ph - h:.1f}" width="{slot * 0.8:.1f}" '
            f'height="{h:.1f}" fill="{COLORS[0]}"><title>{escape(label)}: {_fmt(value)}</title></rect>'
        )
        if i % every == 0:
            cx = x + slot / 2
            parts.append(
                f'<text x="{cx:.1f}" y="{top + ph + 14}" text-anchor="end" {FONT} '
                f'transform="rotate(-30 {cx:.1f} {top + ph + 14})">{escape(label)}</text>'
            )
    if y_label:
        parts.append(
            f'<text x="12" y="{top + ph / 2}" text-anchor="middle" {FONT} '
            f'transform="rotate(-90 12 {top + ph / 2})">{escape(y_label)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)
