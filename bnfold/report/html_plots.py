"""The SVG plots of the HTML report (``bnfold.report.html``): inline SVG, no scripts.

- :func:`sites_svg` *error along the network*: max abs error of each fold site (y, log10) against
  the BN's position in the reference graph (x); failing sites red; each point has a ``<title>``
  (hover text) with the BN name and the value. Zero errors sit on a row labelled 0 under the lowest
  decade, non-finite ones on a row labelled inf/nan above the highest.
- :func:`outputs_svg` *error summary per output*: bars of max, p99, mean and median
  |candidate - reference| per output on a log scale;
- :func:`histogram_svg` *error histogram per output*: elements per decade of |candidate - reference|
  (from ``OutputMetrics.error_histogram``). Its title is HTML (a ``figcaption``), so it wraps
  instead of being clipped by the SVG's width.

Every string from the records goes through :func:`html.escape`.
"""
from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from typing import Any

from bnfold.report.summary import controls_escaped, fmt
from bnfold.run_records import HIST_ZERO, OutputMetrics, ProviderRun, SiteResult

__all__ = ["sites_svg", "outputs_svg", "histogram_svg", "PASS_COLOR", "FAIL_COLOR"]

PASS_COLOR = "#1f6feb"
FAIL_COLOR = "#d1242f"
SVG_NS = "http://www.w3.org/2000/svg"
BAR_COLORS = (("max_abs", "max", "#8250df"), ("p99_abs", "p99", "#1f6feb"),
              ("mean_abs", "mean", "#2da44e"), ("median_abs", "median", "#bf8700"))


def _e(value: Any) -> str:
    return html.escape(controls_escaped("" if value is None else str(value)), quote=True)


def _num(x: float) -> str:
    """A coordinate for SVG attributes."""
    return f"{x:.2f}"


def _log10(value: Any) -> float | None:
    """log10 of a positive finite value; -inf for 0 (and negatives); None for inf/nan."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(v):
        return None
    return math.log10(v) if v > 0 else -math.inf


def _decades(logs: Sequence[float]) -> tuple[int, int]:
    finite = [v for v in logs if math.isfinite(v)]
    if not finite:
        return -8, 0
    lo, hi = math.floor(min(finite)), math.ceil(max(finite))
    if hi <= lo:
        hi = lo + 1
    return lo, hi


def _y_axis(parts: list[str], lo: int, hi: int, y_of: Callable[[float], float], left: float, right: float,
            labels: dict[int, str] | None = None) -> None:
    labels = labels or {}
    step = max(1, math.ceil((hi - lo) / 10))
    decades = set(range(lo, hi + 1, step)) | set(labels)
    for d in sorted(decades):
        y = y_of(d)
        dash = ' stroke-dasharray="3 3"' if d in labels else ""
        parts.append(f'<line x1="{_num(left)}" y1="{_num(y)}" x2="{_num(right)}" y2="{_num(y)}" '
                     f'stroke="#d0d7de"{dash}/>')
        text = labels.get(d, f"1e{d}")
        parts.append(f'<text x="{_num(left - 6)}" y="{_num(y + 4)}" text-anchor="end">{text}</text>')


# ---- plot 1: fold sites along the network -------------------------------------------------------
def sites_svg(sites: Sequence[SiteResult], first_divergent: str | None = None) -> str:
    """The scatter/line plot of log10 max abs error per fold site against its position."""
    width, height = 760, 320
    left, right, top, bottom = 64, 16, 32, 44
    pw, ph = width - left - right, height - top - bottom
    ordered = sorted(sites, key=lambda s: s.position)
    logs = [_log10(s.max_abs) for s in ordered]
    tol_logs = [_log10(s.atol) for s in ordered]
    lo, hi = _decades([v for v in logs + tol_logs if v is not None])
    # zero errors get their own row under the lowest decade, inf/nan one above the highest
    labels: dict[int, str] = {}
    if any(v is not None and v == -math.inf for v in logs):
        lo -= 1
        labels[lo] = "0"
    if any(v is None for v in logs):
        hi += 1
        labels[hi] = "inf/nan"

    xs = [s.position for s in ordered]
    x0, x1 = min(xs), max(xs)
    span = (x1 - x0) or 1

    def x_of(p: float) -> float:
        if x1 == x0:
            return left + pw / 2
        return left + (p - x0) / span * pw

    def y_of(v: float) -> float:
        v = min(max(v, lo), hi)
        return top + (hi - v) / (hi - lo) * ph

    parts = [
        f'<svg xmlns="{SVG_NS}" class="plot sites" role="img" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" aria-label="max abs error per fold site along the network">',
    ]
    _y_axis(parts, lo, hi, y_of, left, left + pw, labels)
    # x ticks: at most 8 positions, the first and the last included
    ticks = sorted({x0, x1} | {round(x0 + span * k / 7) for k in range(8)}) if x1 > x0 else [x0]
    for p in ticks:
        x = x_of(p)
        parts.append(f'<line x1="{_num(x)}" y1="{_num(top + ph)}" x2="{_num(x)}" '
                     f'y2="{_num(top + ph + 4)}" stroke="#57606a"/>')
        parts.append(f'<text x="{_num(x)}" y="{_num(top + ph + 16)}" text-anchor="middle">{p}</text>')
    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#8c959f"/>')
    parts.append(f'<text x="{_num(left + pw / 2)}" y="{height - 6}" text-anchor="middle">'
                 'fold site position (node index of the BN in the reference graph)</text>')
    parts.append(f'<text x="14" y="{_num(top + ph / 2)}" text-anchor="middle" '
                 f'transform="rotate(-90 14 {_num(top + ph / 2)})">max abs error (log10)</text>')
    # one tolerance line when every site shares one atol
    atols = {float(s.atol) for s in ordered}
    if len(atols) == 1 and tol_logs and tol_logs[0] is not None and math.isfinite(tol_logs[0]):
        y = y_of(tol_logs[0])
        parts.append(f'<line class="atol" x1="{left}" y1="{_num(y)}" x2="{left + pw}" '
                     f'y2="{_num(y)}" stroke="{FAIL_COLOR}" stroke-dasharray="4 3" opacity="0.6">'
                     f'<title>atol {_e(fmt(next(iter(atols))))}</title></line>')
    points = []
    for s, v in zip(ordered, logs):
        y = y_of(hi) if v is None else y_of(v)  # inf/nan on the top row, zero on the bottom row
        points.append((x_of(s.position), y))
    if len(points) > 1:
        coords = " ".join(f"{_num(x)},{_num(y)}" for x, y in points)
        parts.append(f'<polyline points="{coords}" fill="none" stroke="#8c959f" stroke-width="1"/>')
    for s, (x, y) in zip(ordered, points):
        color = PASS_COLOR if s.passed else FAIL_COLOR
        status = "within tolerance" if s.passed else "OUT OF TOLERANCE"
        first = " (first divergent)" if s.bn == first_divergent else ""
        tip = (f"{s.bn}{first}: max abs {fmt(s.max_abs)}, max rel {fmt(s.max_rel)}, "
               f"atol {fmt(s.atol)}, position {s.position}, {s.direction} into {s.target}, {status}")
        klass = "site pass" if s.passed else "site fail"
        ring = ' r="6" stroke="#000" stroke-width="1.5"' if first else ' r="4" stroke="#fff" stroke-width="1"'
        parts.append(f'<circle class="{klass}" cx="{_num(x)}" cy="{_num(y)}"{ring} fill="{color}">'
                     f'<title>{_e(tip)}</title></circle>')
    # legend above the plot area (rects: circles are the data points only)
    for i, (color, label) in enumerate(((PASS_COLOR, "within tolerance"), (FAIL_COLOR, "out of tolerance"))):
        lx, ly = left + i * 150, 10
        parts.append(f'<rect x="{lx}" y="{ly}" width="10" height="10" fill="{color}"/>')
        parts.append(f'<text x="{lx + 16}" y="{ly + 9}">{label}</text>')
    parts.append("</svg>")
    return "".join(parts)


# ---- plot 2: error summary per output -----------------------------------------------------------
def outputs_svg(runs: Sequence[ProviderRun]) -> str:
    """Bars of max / p99 / mean / median abs error per (provider, output), log scale."""
    groups = [(r.provider, o) for r in runs if r.status == "ran" for o in r.outputs]
    nbar = len(BAR_COLORS)
    bar_w, gap = 14, 18
    left, right, top, bottom = 64, 16, 28, 64
    pw = max(320, len(groups) * (nbar * bar_w + gap) + gap)
    ph = 220
    width, height = left + pw + right, top + ph + bottom
    logs = [_log10(getattr(o, key)) for _, o in groups for key, _, _ in BAR_COLORS]
    lo, hi = _decades([v for v in logs if v is not None])
    lo -= 1  # leave room so the smallest bar is visible

    def y_of(v: float) -> float:
        v = min(max(v, lo), hi)
        return top + (hi - v) / (hi - lo) * ph

    parts = [
        f'<svg xmlns="{SVG_NS}" class="plot outputs" role="img" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" aria-label="error summary per output, log scale">',
    ]
    _y_axis(parts, lo, hi, y_of, left, left + pw)
    base = top + ph
    several_providers = len({p for p, _ in groups}) > 1  # once, not per bar group (quadratic)
    for g, (provider, o) in enumerate(groups):
        gx = left + gap + g * (nbar * bar_w + gap)
        for b, (key, label, color) in enumerate(BAR_COLORS):
            value = getattr(o, key)
            v = _log10(value)
            y = y_of(hi) if v is None else y_of(v)
            h = max(0.0, base - y)
            extra = ' stroke="#000" stroke-dasharray="2 2"' if v is None else ""
            tip = f"{provider} / {o.name}: {label} |candidate - reference| = {fmt(value)}"
            parts.append(f'<rect class="bar" x="{_num(gx + b * bar_w)}" y="{_num(y)}" '
                         f'width="{bar_w - 2}" height="{_num(h)}" fill="{color}"{extra}>'
                         f'<title>{_e(tip)}</title></rect>')
        cx = gx + nbar * bar_w / 2
        label = o.name if len(o.name) <= 18 else o.name[:8] + "..." + o.name[-7:]
        parts.append(f'<text x="{_num(cx)}" y="{base + 14}" text-anchor="middle">{_e(label)}</text>')
        if several_providers:
            parts.append(f'<text x="{_num(cx)}" y="{base + 27}" text-anchor="middle">'
                         f'{_e(provider)}</text>')
    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#8c959f"/>')
    parts.append(f'<text x="14" y="{_num(top + ph / 2)}" text-anchor="middle" '
                 f'transform="rotate(-90 14 {_num(top + ph / 2)})">abs error (log10)</text>')
    for i, (_, label, color) in enumerate(BAR_COLORS):
        lx = left + i * 80
        parts.append(f'<rect x="{lx}" y="8" width="10" height="10" fill="{color}"/>')
        parts.append(f'<text x="{lx + 14}" y="17">{label}</text>')
    parts.append("</svg>")
    return "".join(parts)


def histogram_svg(provider: str, o: OutputMetrics) -> str:
    """Histogram of |candidate - reference| over the elements of one output, by decade."""
    bins = dict(o.error_histogram)
    keys = sorted(k for k in bins if k != HIST_ZERO)
    cols = ([HIST_ZERO] if HIST_ZERO in bins else []) + (list(range(keys[0], keys[-1] + 1)) if keys else [])
    left, right, top, bottom, col_w = 48, 12, 12, 24, 34
    pw, ph = max(200, len(cols) * col_w), 140
    width, height = left + pw + right, top + ph + bottom
    peak = max(bins.values(), default=1) or 1
    parts = [f'<svg xmlns="{SVG_NS}" class="plot histogram" role="img" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" aria-label="error histogram of {_e(provider)} / {_e(o.name)}">']
    for i, k in enumerate(cols):
        n = bins.get(k, 0)
        h = ph * n / peak
        x = left + i * col_w
        label = "0" if k == HIST_ZERO else f"1e{k}"
        color = FAIL_COLOR if k != HIST_ZERO and 10.0 ** k > o.atol + o.rtol else PASS_COLOR
        parts.append(f'<rect class="hbar" x="{x + 2}" y="{_num(top + ph - h)}" width="{col_w - 4}" '
                     f'height="{_num(h)}" fill="{color}"><title>{_e(label)}: {n} element(s)</title></rect>')
        parts.append(f'<text x="{_num(x + col_w / 2)}" y="{top + ph + 14}" text-anchor="middle" '
                     f'font-size="9">{_e(label)}</text>')
    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#8c959f"/>')
    parts.append(f'<text x="4" y="{top + 10}" font-size="9">{peak}</text>')
    parts.append(f'<text x="4" y="{top + ph}" font-size="9">0</text></svg>')
    return "".join(parts)
