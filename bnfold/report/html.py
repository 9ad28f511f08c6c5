"""A self-contained HTML page for one verification: ``render_html`` / ``write_html``.

One file, no network access: inline CSS and inline SVG only (``html_plots``), no scripts, no
external fonts or stylesheets, and a Content-Security-Policy that forbids fetching anything.

The page reads at a glance in a 1400 px window, without horizontal scrolling (a test renders it in
headless Chromium and measures it). It leads with the diagnosis:

1. the verdict banner;
2. *Diagnosis*: the rule (and the noise floor when the verification has one), the first divergent
   fold site with its worst channels, how many sites are out of tolerance;
3. *Outputs*: one table per provider, worst output first (failing, then by max abs error);
4. the plots: error along the network beside the error summary per output, then the histograms;
5. *Fold sites*: every site along the network;
6. *Settings*, *Inputs* and *Environment* last.

Numbers never wrap (``white-space: nowrap``; ``fmt`` keeps 3 significant digits); long names are
elided in the middle where they still read apart (``summary.elide_apart``:
``/stages/stages.0/bn1...Normalization``), with the full name in a ``title`` attribute.
Every string from the records goes through :func:`html.escape`.
"""
from __future__ import annotations

import html
import json
import os
import re
from collections.abc import Sequence
from typing import Any

from bnfold.report.facts import VerifyFacts, magnitude, verify_facts
from bnfold.report.html_plots import FAIL_COLOR, PASS_COLOR, histogram_svg, outputs_svg, sites_svg
from bnfold.report.json_report import write_text_atomic
from bnfold.report.summary import (
    channels_text,
    controls_escaped,
    elide_apart,
    ellipsize,
    floor_setting_text,
    fmt,
    fmt_cosine,
    fmt_fraction,
    fmt_pct,
    run_label,
    samples_text,
    tolerance_text,
)
from bnfold.run_records import OutputMetrics, ProviderRun, SiteResult, VerifyResult

__all__ = ["render_html", "write_html", "PASS_COLOR", "FAIL_COLOR", "NAME_WIDTH", "OUTPUTS_SHOWN"]

#: characters a name keeps before it is elided in the middle: in the outputs table, and the BN and
#: target names in the fold-sites table (sized so that the widest table fits a 1400 px window)
NAME_WIDTH = 28
SITE_NAME_WIDTH = 36
SITE_TARGET_WIDTH = 26
#: worst channels a fold-site row lists (all of them in its hover text)
CHANNELS_SHOWN = 2
#: outputs per provider listed in the diagnosis before the rest fold away under "more outputs"
OUTPUTS_SHOWN = 10

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;
color:#1f2328;background:#fff;line-height:1.4}
main{max-width:1340px;margin:0 auto;padding:0 16px 32px;box-sizing:border-box}
.banner{padding:12px 24px;color:#fff}
.banner.pass{background:#1a7f37}.banner.fail{background:#cf222e}
.banner h1{margin:0 0 2px;font-size:1.25em}.banner p{margin:0;font-size:1.1em;font-weight:600}
h2{border-bottom:1px solid #d0d7de;padding-bottom:4px;margin:20px 0 8px;font-size:1.25em}
h3{margin:12px 0 4px;font-size:1.05em}
ul.diagnosis{margin:4px 0;padding-left:20px}ul.diagnosis li{margin:2px 0}
table{border-collapse:collapse;margin:6px 0;font-size:.85em}
th,td{border:1px solid #d0d7de;padding:2px 5px;text-align:left;vertical-align:top}
table.outputs th,table.outputs td,table.sites th,table.sites td{white-space:nowrap}
th{background:#f6f8fa}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.fail td{background:#ffebe9}.ok{color:#1a7f37;font-weight:600}.bad{color:#cf222e;font-weight:600}
.skip{color:#6e7781;font-weight:600}
table.kv td{overflow-wrap:anywhere;word-break:break-word}table.kv th{white-space:nowrap}
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.95em}
.plots{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
figure{margin:4px 0;max-width:100%}figcaption{font-size:.85em;color:#57606a;max-width:760px}
figure.hist figcaption{max-width:none}
svg{background:#fff;border:1px solid #d0d7de;max-width:100%;height:auto;display:block}
svg text{font-size:11px;fill:#57606a;font-family:system-ui,sans-serif}
.muted{color:#6e7781}p.note{font-size:.85em;margin:4px 0}details summary{cursor:pointer;color:#57606a;font-size:.9em}
"""


def _figure(svg: str, caption: str, ident: str = "", klass: str = "", caption_first: bool = False) -> str:
    """A ``<figure>`` as wide as its SVG (the caption wraps within it; plots sit side by side)."""
    found = re.search(r'width="(\d+)"', svg)
    style = f' style="width:{found.group(1)}px;max-width:100%"' if found else ""
    attrs = (f' id="{ident}"' if ident else "") + (f' class="{klass}"' if klass else "")
    inner = caption + svg if caption_first else svg + caption
    return f"<figure{attrs}{style}>{inner}</figure>"


def _e(value: Any) -> str:
    return html.escape(controls_escaped("" if value is None else str(value)), quote=True)


def _name(text: Any, width: int = NAME_WIDTH, apart: dict[str, str] | None = None) -> str:
    """``<code>`` with ``text`` elided in the middle to ``width`` characters (as ``apart`` elides it,
    where given: a column's names told apart by ``elide_apart``); the full name in a ``title``
    attribute (hover text) when elided."""
    full = "" if text is None else str(text)
    shown = apart[full] if apart is not None and full in apart else ellipsize(full, width)
    if shown == full:
        return f"<code>{_e(full)}</code>"
    return f'<code title="{_e(full)}">{_e(shown)}</code>'


def _num(value: Any, *, title: str | None = None) -> str:
    tip = f' title="{_e(title)}"' if title else ""
    return f'<td class="num"{tip}>{_e(value)}</td>'


def _floor(record: Any) -> Any:
    """The reference's own noise floor of an output or a fold site, where the verification has one
    (``floor_max``; None in records from verifications without it)."""
    return getattr(record, "floor_max", None)


def _verdict_cell(passed: bool) -> str:
    return '<td class="ok">pass</td>' if passed else '<td class="bad">FAIL</td>'


def _head(cells: list[tuple[str, str]]) -> str:
    """A ``<thead>`` row; each cell is (label, hover text)."""
    ths = "".join(f'<th title="{_e(tip)}">{_e(label)}</th>' if tip else f"<th>{_e(label)}</th>"
                  for label, tip in cells)
    return f"<thead><tr>{ths}</tr></thead>"


def _tolerance(o: OutputMetrics | SiteResult) -> str:
    return f"{fmt(o.atol)} / {fmt(o.rtol)}"


def _worst_first(outputs: tuple[OutputMetrics, ...]) -> list[OutputMetrics]:
    return sorted(outputs, key=lambda o: (bool(o.passed), -magnitude(o.max_abs)))


# ---- diagnosis ----------------------------------------------------------------------------------
def _setting_text(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_setting_text(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_setting_text(v) for v in value)
    return fmt(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _first_site_item(facts: VerifyFacts) -> str:
    s = facts.first_site
    if s is None:
        return ""
    label = ("First divergent fold site" if s.bn == facts.result.first_divergent_site
             else "First fold site out of tolerance")
    text = (f'<li id="first-site"><strong>{label}:</strong> {_name(s.bn, 72)} ({_e(s.direction)} into '
            f"{_name(s.target, 48)}, tensor {_name(s.tensor, 48)}, position {s.position}): "
            f"max abs <strong>{_e(fmt(s.max_abs))}</strong>, max rel {_e(fmt(s.max_rel))} "
            f"(atol {_e(fmt(s.atol))}, rtol {_e(fmt(s.rtol))}")
    floor = _floor(s)
    if floor is not None:
        text += f", noise floor {_e(fmt(floor))}"
    text += ")"
    if s.worst_channels:
        text += f"; worst channels {_e(channels_text(s))}"
    return text + "</li>"


def _diagnosis(facts: VerifyFacts) -> list[str]:
    result = facts.result
    out = ['<section id="diagnosis"><h2>Diagnosis</h2><ul class="diagnosis">']
    if result.sites:
        out.append(_first_site_item(facts))
        failing = len(facts.failing_sites)
        if failing:
            out.append(f"<li>Fold sites: <strong>{failing} of {len(result.sites)}</strong> out of tolerance "
                       "(a site after the first divergent one inherits its error)</li>")
        else:
            out.append(f"<li>Fold sites: all {len(result.sites)} within tolerance</li>")
    elif result.first_divergent_site:
        out.append(f"<li><strong>First divergent fold site:</strong> {_name(result.first_divergent_site, 72)}</li>")
    for run in result.runs:  # a provider that ran and compared nothing: the candidate failed to run
        if run.status == "ran" and not run.outputs and run.note:
            out.append(f'<li class="bad">{_e(run.provider)}: {_e(run.note)}</li>')
    out.append(f"<li>Rule: <code>{_e(result.rule)}</code></li>")
    floor = facts.settings.get("noise_floor")
    if floor is not None:
        out.append(f'<li id="noise-floor">{_e(floor_setting_text(facts.settings))}</li>')
    if result.note:
        out.append(f"<li>{_e(result.note)}</li>")
    if result.repro_dir:
        out.append(f"<li>Reproduction files: <code>{_e(result.repro_dir)}</code></li>")
    out.append("</ul></section>")
    return out


# ---- tables -------------------------------------------------------------------------------------
def _output_row(o: OutputMetrics, noise: dict[str, float], with_floor: bool, names: dict[str, str]) -> str:
    cells = [f"<td>{_name(o.name, NAME_WIDTH, names)}</td>", f"<td>{_e(o.dtype)} {_e(list(o.shape))}</td>",
             _num(fmt(o.max_abs))]
    if with_floor:
        cells.append(_num(fmt(_floor(o))))
    if noise:
        cells.append(_num(fmt(noise.get(o.name))))
    ulp = None if o.max_ulp is None else fmt(float(o.max_ulp)) if o.max_ulp >= 1e6 else fmt(o.max_ulp)
    cells += [_num(x) for x in (
        fmt(o.p99_abs), fmt(o.max_rel), f"{o.mismatches} ({fmt_pct(o.mismatch_pct)})",
        fmt_cosine(o.cosine), fmt(o.snr_db), fmt(ulp), fmt_fraction(o.top1))]
    tip = f"{tolerance_text(o)}; the smallest atol that passes at this rtol: {fmt(o.min_atol)}"
    cells.append(f'<td title="{_e(tip)}">{_e(_tolerance(o))}'
                 f'{"" if o.error_stat == "max" else " on " + _e(o.error_stat)}</td>')
    cells.append(_verdict_cell(o.passed))
    return f'<tr class="{"pass" if o.passed else "fail"}">' + "".join(cells) + "</tr>"


def _outputs_table(outputs: list[OutputMetrics], noise: dict[str, float], with_floor: bool) -> str:
    head = [("output", ""), ("dtype shape", ""), ("max abs", "max |candidate - reference|")]
    if with_floor:
        head.append(("noise floor", "the reference's own float rounding noise at this output"))
    if noise:
        head.append(("provider noise", "max |reference on this provider - reference on the first provider|"))
    head += [("p99 abs", ""), ("max rel", ""), ("mismatches", "elements out of tolerance"),
             ("cosine", ""), ("SNR dB", ""), ("max ULP", ""), ("top-1", ""),
             ("atol / rtol", "hover a cell for the smallest atol that passes"), ("verdict", "")]
    names = elide_apart([o.name for o in outputs], NAME_WIDTH)
    rows = "".join(_output_row(o, noise, with_floor, names) for o in outputs)
    return f'<table class="outputs">{_head(head)}<tbody>{rows}</tbody></table>'


def _run_section(run: ProviderRun, noise: dict[str, float]) -> str:
    if run.status != "ran":
        note = f": {_e(run.note)}" if run.note else ""
        return (f'<h3>{_e(run.provider)} <span class="skip">{_e(run.status)}</span></h3>'
                f'<p class="muted">provider {_e(run.status)}{note}</p>')
    mark = '<span class="ok">passed</span>' if run.passed else '<span class="bad">FAILED</span>'
    out = [f'<h3>{_e(run.provider)} {mark} <span class="muted">{_e(run_label(run))}</span></h3>']
    if run.note:
        out.append(f"<p>{_e(run.note)}</p>")
    if not run.outputs:
        out.append('<p class="muted">no outputs compared</p>')
        return "".join(out)
    ordered = _worst_first(run.outputs)
    with_floor = any(_floor(o) is not None for o in ordered)
    out.append(_outputs_table(ordered[:OUTPUTS_SHOWN], noise, with_floor))
    if len(ordered) > OUTPUTS_SHOWN:
        rest = ordered[OUTPUTS_SHOWN:]
        out.append(f"<details><summary>{len(rest)} more output(s), all "
                   f"{'within tolerance' if all(o.passed for o in rest) else 'listed worst first'}</summary>"
                   + _outputs_table(rest, noise, with_floor) + "</details>")
    return "".join(out)


def _channels_cell(s: SiteResult) -> str:
    """The worst channels, the first ``CHANNELS_SHOWN`` in the cell and all of them on hover."""
    if not s.worst_channels:
        return "<td>-</td>"
    shown = ", ".join(f"{c} ({fmt(v)})" for c, v in s.worst_channels[:CHANNELS_SHOWN])
    if len(s.worst_channels) > CHANNELS_SHOWN:
        shown += ", ..."
    return f'<td title="{_e(channels_text(s))}">{_e(shown)}</td>'


def _sites_table(facts: VerifyFacts) -> str:
    result = facts.result
    with_floor = any(_floor(s) is not None for s in result.sites)
    head = [("#", "node position of the BN in the reference graph"), ("BN", ""),
            ("folded into", "direction and target node"), ("max abs", ""), ("max rel", "")]
    if with_floor:
        head.append(("noise floor", "the reference's own float rounding noise at this site"))
    head += [("atol / rtol", ""), ("worst channels", "channel (max abs error)"), ("verdict", "")]
    rows = []
    bns = elide_apart([s.bn for s in result.sites], SITE_NAME_WIDTH)
    targets = elide_apart([s.target for s in result.sites], SITE_TARGET_WIDTH)
    for s in facts.sites_by_position:
        cells = [_num(s.position), f"<td>{_name(s.bn, SITE_NAME_WIDTH, bns)}</td>",
                 f'<td title="tensor {_e(s.tensor)}">{_e(s.direction)} '
                 f"{_name(s.target, SITE_TARGET_WIDTH, targets)}</td>",
                 _num(fmt(s.max_abs)), _num(fmt(s.max_rel))]
        if with_floor:
            cells.append(_num(fmt(_floor(s))))
        cells.append(_num(_tolerance(s)))
        cells.append(_channels_cell(s))
        if s.bn == result.first_divergent_site and not s.passed:
            cells.append('<td class="bad" title="the first divergent fold site">FAIL (first)</td>')
        else:
            cells.append(_verdict_cell(s.passed))
        rows.append(f'<tr class="{"pass" if s.passed else "fail"}">' + "".join(cells) + "</tr>")
    return f'<table class="sites">{_head(head)}<tbody>{"".join(rows)}</tbody></table>'


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


# ---- plots --------------------------------------------------------------------------------------
_SITES_CAPTION = (
    "<figcaption><strong>Error along the network.</strong> Max abs error at each fold site (folded producer "
    "output against the original BN output, CPU): x is the BN's node position in the reference graph, y is "
    "log10 of the error. Red points are out of tolerance; zero errors sit on the bottom row (0), inf/nan on "
    "the top row; the first divergent site has a black ring. Hover a point for the BN name and value."
    "</figcaption>")
_OUTPUTS_CAPTION = (
    "<figcaption><strong>Error summary per output.</strong> Max, 99th percentile, mean and median of "
    "|candidate &#8722; reference| per output, log scale. Zero values have no bar; dashed full-height bars "
    "are inf/nan. How the element errors spread: the histograms below.</figcaption>")


def _plots(result: VerifyResult) -> list[str]:
    out = ['<section id="plots"><h2>Plots</h2><div class="plots">']
    if result.sites:
        out.append(_figure(sites_svg(result.sites, result.first_divergent_site), _SITES_CAPTION, "sites-plot"))
    else:
        out.append('<p class="muted">No fold sites were compared.</p>')
    if any(r.status == "ran" and r.outputs for r in result.runs):
        out.append(_figure(outputs_svg(result.runs), _OUTPUTS_CAPTION, "outputs-plot"))
    else:
        out.append('<p class="muted">No outputs were compared.</p>')
    out.append("</div>")
    hists = [(r.provider, o) for r in result.runs if r.status == "ran" for o in r.outputs if o.error_histogram]
    if hists:
        out.append('<h3 id="histograms">Error histogram per output</h3><p class="muted note">Output elements per '
                   "decade of |candidate &#8722; reference| (column 1eK counts errors in [10^K, 10^(K+1)); 0 "
                   "counts exact matches). Red columns lie wholly above atol + rtol.</p><div class=\"plots\">")
        out.extend(_figure(histogram_svg(provider, o),
                           f"<figcaption>{_e(provider)} / {_name(o.name, 40)}</figcaption>", klass="hist",
                           caption_first=True)
                   for provider, o in hists)
        out.append("</div>")
    out.append("</section>")
    return out


# ---- the page -----------------------------------------------------------------------------------
def render_html(result: VerifyResult, title: str = "bnfold verification",
                statistics: Sequence[str] | None = None) -> str:
    """The whole page as one string (self-contained: no scripts, no external resources).
    ``statistics``: a fold's calibration lines (:func:`bnfold.report.summary.statistics_lines`), a
    "Calibration" section after the diagnosis."""
    facts = verify_facts(result)
    word = facts.verdict
    providers = ", ".join(facts.providers) or "no provider"
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
    ]
    parts.extend(_diagnosis(facts))
    if statistics:
        parts.append('<section id="calibration"><h2>Calibration</h2>')
        parts.extend(f"<p>{_e(line)}</p>" for line in statistics)
        parts.append("</section>")

    parts.append('<section id="outputs"><h2>Outputs</h2>')
    if not result.runs:
        parts.append('<p class="muted">no provider ran</p>')
    parts.extend(_run_section(r, noise) for r, noise in zip(result.runs, facts.noise))
    parts.append("</section>")

    parts.extend(_plots(result))

    parts.append('<section id="sites"><h2>Fold sites</h2>')
    parts.append(_sites_table(facts) if result.sites
                 else '<p class="muted">No fold sites were compared.</p>')
    parts.append("</section>")

    parts.append('<section id="settings"><h2>Settings</h2>')
    parts.append(_kv_table(facts.settings))
    parts.append("<h3>Inputs</h3>")
    parts.append(_kv_table(facts.inputs))
    parts.append("</section>")
    env = facts.environment()
    versions = env.pop("versions", {}) or {}
    parts.append('<section id="environment"><h2>Environment</h2>')
    parts.append(_kv_table({**env, **{f"version {k}": v for k, v in versions.items()}}))
    parts.append("</section></main></body></html>")
    return "\n".join(parts) + "\n"


def write_html(
    result: VerifyResult, path: str | os.PathLike, title: str = "bnfold verification",
    statistics: Sequence[str] | None = None,
) -> None:
    """Write :func:`render_html` to ``path`` atomically."""
    write_text_atomic(render_html(result, title, statistics), path)
