"""A self-contained HTML page for one verification: ``render_html`` / ``write_html``.

One file, no network access: inline CSS and inline SVG only, no scripts, no external fonts or
stylesheets, and a Content-Security-Policy that forbids fetching anything. It holds the verdict
banner, settings and environment, one table per provider, two plots and the fold-site table:

- *error along the network*: max abs error of each fold site (y, log10) against the BN's position
  in the reference graph (x); failing sites red; each point has a ``<title>`` (hover text) with the
  BN name and the value. Zero errors sit on a row labelled 0 under the lowest decade, non-finite
  ones on a row labelled inf/nan above the highest.
- *error summary per output*: bars of max, p99, mean and median |candidate - reference| per output
  on a log scale;
- *error histogram per output*: elements per decade of |candidate - reference| (from
  ``OutputMetrics.error_histogram``).

Every string from the records goes through :func:`html.escape`.
"""
from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

from bnfold.records import HIST_ZERO, OutputMetrics, ProviderRun, SiteResult, VerifyResult
from bnfold.report.facts import VerifyFacts, verify_facts
from bnfold.report.json_report import write_text_atomic
from bnfold.report.summary import (
    channels_text,
    floor_setting_text,
    fmt,
    fmt_cosine,
    fmt_fraction,
    fmt_pct,
    run_label,
    samples_text,
    tolerance_text,
)

__all__ = ["render_html", "write_html", "PASS_COLOR", "FAIL_COLOR"]

PASS_COLOR = "#1f6feb"
FAIL_COLOR = "#d1242f"
SVG_NS = "http://www.w3.org/2000/svg"
BAR_COLORS = (("max_abs", "max", "#8250df"), ("p99_abs", "p99", "#1f6feb"),
              ("mean_abs", "mean", "#2da44e"), ("median_abs", "median", "#bf8700"))

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;
color:#1f2328;background:#fff;line-height:1.4}
main{max-width:1100px;margin:0 auto;padding:0 16px 32px}
.banner{padding:16px 24px;color:#fff}
.banner.pass{background:#1a7f37}.banner.fail{background:#cf222e}
.banner h1{margin:0 0 4px;font-size:1.4em}.banner p{margin:0}
h2{border-bottom:1px solid #d0d7de;padding-bottom:4px;margin-top:28px}
table{border-collapse:collapse;margin:8px 0;font-size:.9em}
th,td{border:1px solid #d0d7de;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f6f8fa}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.fail td{background:#ffebe9}.ok{color:#1a7f37;font-weight:600}.bad{color:#cf222e;font-weight:600}
.skip{color:#6e7781;font-weight:600}
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.95em}
figure{margin:8px 0}figcaption{font-size:.85em;color:#57606a;max-width:760px}
svg{background:#fff;border:1px solid #d0d7de;max-width:100%;height:auto}
svg text{font-size:11px;fill:#57606a;font-family:system-ui,sans-serif}
.muted{color:#6e7781}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


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
        if len({p for p, _ in groups}) > 1:
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
    left, right, top, bottom, col_w = 48, 12, 24, 40, 34
    pw, ph = max(200, len(cols) * col_w), 140
    width, height = left + pw + right, top + ph + bottom
    peak = max(bins.values(), default=1) or 1
    parts = [f'<svg xmlns="{SVG_NS}" class="plot histogram" role="img" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" aria-label="error histogram of {_e(o.name)}">',
             f'<text x="{left}" y="14">{_e(provider)} / {_e(o.name)}: elements per decade of |a-b|</text>']
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
    parts.append(f'<text x="4" y="{top + 10}" font-size="9">{peak}</text></svg>')
    return "".join(parts)


# ---- tables -------------------------------------------------------------------------------------
def _kv_table(mapping: dict[str, Any]) -> str:
    rows = []
    for key, value in mapping.items():
        if isinstance(value, (dict, list)):
            shown = json.dumps(value, allow_nan=False, ensure_ascii=False, sort_keys=True)
        else:
            shown = "-" if value is None else str(value)
        rows.append(f"<tr><th>{_e(key)}</th><td><code>{_e(shown)}</code></td></tr>")
    if not rows:
        return '<p class="muted">none recorded</p>'
    return '<table class="kv">' + "".join(rows) + "</table>"


def _verdict_cell(passed: bool) -> str:
    return '<td class="ok">pass</td>' if passed else '<td class="bad">FAIL</td>'


def _run_section(run: ProviderRun, noise: dict[str, float]) -> str:
    if run.status != "ran":
        note = f": {_e(run.note)}" if run.note else ""
        return (f'<h3>{_e(run.provider)} <span class="skip">{_e(run.status)}</span></h3>'
                f'<p class="muted">provider {_e(run.status)}{note}</p>')
    mark = '<span class="ok">passed</span>' if run.passed else '<span class="bad">FAILED</span>'
    out = [f"<h3>{_e(run.provider)} {mark}</h3>",
           f"<p>{_e(run_label(run))}{' (' + _e(run.note) + ')' if run.note else ''}</p>"]
    if not run.outputs:
        out.append('<p class="muted">no outputs compared</p>')
        return "".join(out)
    head = ["output", "dtype", "shape", "max abs"] + (["noise floor"] if noise else []) + [
        "p99 abs", "mean abs", "max rel", "mismatches", "cosine", "SNR dB", "max ULP", "top-1",
        "min atol", "tolerance", "verdict"]
    out.append('<table class="outputs"><thead><tr>' + "".join(f"<th>{h}</th>" for h in head)
               + "</tr></thead><tbody>")
    for o in run.outputs:
        cells = [f"<td><code>{_e(o.name)}</code></td>", f"<td>{_e(o.dtype)}</td>",
                 f"<td>{_e(list(o.shape))}</td>", f'<td class="num">{_e(fmt(o.max_abs))}</td>']
        if noise:
            cells.append(f'<td class="num">{_e(fmt(noise.get(o.name)))}</td>')
        cells += [f'<td class="num">{_e(x)}</td>' for x in (
            fmt(o.p99_abs), fmt(o.mean_abs), fmt(o.max_rel),
            f"{o.mismatches} ({fmt_pct(o.mismatch_pct)})", fmt_cosine(o.cosine), fmt(o.snr_db),
            fmt(o.max_ulp), fmt_fraction(o.top1), fmt(o.min_atol))]
        cells.append(f"<td>{_e(tolerance_text(o))}</td>")
        cells.append(_verdict_cell(o.passed))
        out.append(f'<tr class="{"pass" if o.passed else "fail"}">' + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _sites_table(facts: VerifyFacts) -> str:
    result = facts.result
    head = ["position", "BN", "tensor", "direction", "target", "max abs", "max rel", "atol",
            "rtol", "worst channels", "verdict"]
    out = ['<table class="sites"><thead><tr>' + "".join(f"<th>{h}</th>" for h in head)
           + "</tr></thead><tbody>"]
    for s in facts.sites_by_position:
        first = " (first divergent)" if s.bn == result.first_divergent_site else ""
        cells = [
            f'<td class="num">{s.position}</td>', f"<td><code>{_e(s.bn)}</code>{first}</td>",
            f"<td><code>{_e(s.tensor)}</code></td>", f"<td>{_e(s.direction)}</td>",
            f"<td><code>{_e(s.target)}</code></td>",
        ] + [f'<td class="num">{_e(fmt(x))}</td>' for x in (s.max_abs, s.max_rel, s.atol, s.rtol)]
        cells.append(f"<td>{_e(channels_text(s)) if s.worst_channels else '-'}</td>")
        cells.append(_verdict_cell(s.passed))
        out.append(f'<tr class="{"pass" if s.passed else "fail"}">' + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


# ---- the page -----------------------------------------------------------------------------------
def render_html(result: VerifyResult, title: str = "bnfold verification") -> str:
    """The whole page as one string (self-contained: no scripts, no external resources)."""
    facts = verify_facts(result)
    word = facts.verdict
    providers = ", ".join(facts.providers) or "no provider"
    failing_sites = len(facts.failing_sites)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        'style-src \'unsafe-inline\'">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}: {word}</title>",
        f"<style>{_CSS}</style></head><body>",
        f'<header class="banner {"pass" if result.passed else "fail"}"><h1>{_e(title)}</h1>',
        f'<p class="verdict" id="verdict">Verification {word} on {_e(providers)}: '
        f"{samples_text(result.samples)}, max abs {_e(fmt(result.max_abs))}, "
        f"max rel {_e(fmt(result.max_rel))}</p></header><main>",
        '<section id="summary"><h2>Summary</h2><ul>',
        f"<li>Rule: <code>{_e(result.rule)}</code>; {_e(floor_setting_text(result.settings))}</li>",
    ]
    if result.sites:
        parts.append(f"<li>Fold sites: {failing_sites} of {len(result.sites)} out of tolerance</li>")
    if result.first_divergent_site:
        parts.append(f"<li>First divergent fold site: <code>{_e(result.first_divergent_site)}</code></li>")
    if result.note:
        parts.append(f"<li>{_e(result.note)}</li>")
    if result.repro_dir:
        parts.append(f"<li>Reproduction files: <code>{_e(result.repro_dir)}</code></li>")
    parts.append("</ul></section>")

    parts.append('<section id="settings"><h2>Settings</h2>')
    parts.append(_kv_table(facts.settings))
    parts.append("<h3>Inputs</h3>")
    parts.append(_kv_table(facts.inputs))
    parts.append("</section>")
    env = facts.environment()
    versions = env.pop("versions", {}) or {}
    parts.append('<section id="environment"><h2>Environment</h2>')
    parts.append(_kv_table({**env, **{f"version {k}": v for k, v in versions.items()}}))
    parts.append("</section>")

    parts.append('<section id="providers"><h2>Providers</h2>')
    if not result.runs:
        parts.append('<p class="muted">no provider ran</p>')
    parts.extend(_run_section(r, noise) for r, noise in zip(result.runs, facts.noise))
    parts.append("</section>")

    parts.append('<section id="sites-plot"><h2>Error along the network</h2>')
    if result.sites:
        parts.append("<figure>" + sites_svg(result.sites, result.first_divergent_site)
                     + "<figcaption>Max abs error at each fold site (folded producer output against "
                     "the original BN output, CPU) along the network: x is the BN's node position in "
                     "the reference graph, y is log10 of the error. Red points are out of tolerance; "
                     "zero errors sit on the bottom row (0), inf/nan on the top row; the first divergent "
                     "site has a black ring. Hover a point for "
                     "the BN name and value.</figcaption></figure>")
    else:
        parts.append('<p class="muted">No fold sites were compared.</p>')
    parts.append("</section>")

    parts.append('<section id="outputs-plot"><h2>Error summary per output</h2>')
    if any(r.status == "ran" and r.outputs for r in result.runs):
        parts.append("<figure>" + outputs_svg(result.runs)
                     + "<figcaption>Summary statistics of |candidate &#8722; reference| per output "
                     "(max, 99th percentile, mean, median) on a log scale. The report keeps these "
                     "summary metrics only, so this is not a histogram of the individual element "
                     "errors. Zero values have no bar; dashed full-height bars are inf/nan."
                     "</figcaption></figure>")
    else:
        parts.append('<p class="muted">No outputs were compared.</p>')
    parts.append("</section>")

    parts.append('<section id="histograms"><h2>Error histogram per output</h2>')
    hists = [histogram_svg(r.provider, o) for r in result.runs if r.status == "ran" for o in r.outputs
             if o.error_histogram]
    if hists:
        parts.append("<figure>" + "".join(hists) + "<figcaption>Number of output elements per decade of "
                     "|candidate &#8722; reference| (column 1eK counts errors in [10^K, 10^(K+1)); 0 counts "
                     "exact matches). Red columns lie wholly above atol + rtol.</figcaption></figure>")
    else:
        parts.append('<p class="muted">No element errors to plot.</p>')
    parts.append("</section>")

    parts.append('<section id="sites"><h2>Fold sites</h2>')
    parts.append(_sites_table(facts) if result.sites
                 else '<p class="muted">No fold sites were compared.</p>')
    parts.append("</section></main></body></html>")
    return "\n".join(parts) + "\n"


def write_html(
    result: VerifyResult, path: str | os.PathLike, title: str = "bnfold verification"
) -> None:
    """Write :func:`render_html` to ``path`` atomically."""
    write_text_atomic(render_html(result, title), path)
