"""Markdown for pull-request comments and GitHub job summaries: ``markdown_summary``,
``write_markdown`` and ``append_github_step_summary``.

GitHub-flavoured Markdown: a verdict line (✅ / ❌), the first divergent fold site, one table per
provider (one row per output), the 10 worst fold sites, and a settings line. Names are escaped so
that a ``|`` cannot break a table and ``<``/``>``/``&`` cannot open HTML (GitHub renders inline HTML in Markdown).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from bnfold.report.facts import VerifyFacts, verify_facts, worst_sites
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
    shown,
)
from bnfold.run_records import ProviderRun, VerifyResult

__all__ = ["markdown_summary", "write_markdown", "append_github_step_summary", "WORST_SITES"]

PASS_MARK = "✅"
FAIL_MARK = "❌"
SKIP_MARK = "⏭️"
#: how many fold sites the table lists (worst first)
WORST_SITES = 10

_MD_SPECIAL = "\\`*_[]|<>&"


def md_escape(text: Any) -> str:
    """Text safe inside a table cell: Markdown punctuation backslash-escaped, ``<``/``>``/``&`` as
    entities, newlines as spaces, other unprintable characters (NUL, ESC, U+2028) as their escapes."""
    out = []
    for ch in shown(str(text).replace("\r", " ").replace("\n", " ")):
        if ch == "<":
            out.append("&lt;")
        elif ch == ">":
            out.append("&gt;")
        elif ch == "&":
            out.append("&amp;")
        elif ch in _MD_SPECIAL:
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    align = ["---:" if i in right else ":---" for i in range(len(header))]
    return [_row(header), _row(align)] + [_row(r) for r in rows]


def _run_table(run: ProviderRun, noise: dict[str, float]) -> list[str]:
    header = ["output", "max abs", "p99 abs", "max rel", "mismatches", "cosine", "SNR dB",
              "max ULP", "top-1", "atol/rtol", "verdict"]
    floors = any(o.floor_max is not None for o in run.outputs)  # the reference's float noise floor
    if floors:
        header.insert(len(header) - 1, "float floor")
    if noise:
        header.insert(2, "noise floor")
    rows = []
    for o in run.outputs:
        tol = f"{fmt(o.atol)} / {fmt(o.rtol)}"
        if o.error_stat != "max":
            stat = f"q{fmt(o.quantile)}" if o.error_stat == "quantile" else o.error_stat
            tol += f" ({md_escape(stat)})"
        cells = [
            md_escape(o.name),
            fmt(o.max_abs),
            fmt(o.p99_abs),
            fmt(o.max_rel),
            f"{o.mismatches} ({fmt_pct(o.mismatch_pct)})",
            fmt_cosine(o.cosine),
            fmt(o.snr_db),
            fmt(o.max_ulp),
            fmt_fraction(o.top1),
            tol,
            f"{PASS_MARK} pass" if o.passed else f"{FAIL_MARK} fail",
        ]
        if floors:
            cells.insert(len(cells) - 1, fmt(o.floor_max))
        if noise:
            cells.insert(2, fmt(noise.get(o.name)))
        rows.append(cells)
    right = set(range(1, len(header) - 2))
    return _table(header, rows, right)


def _sites_table(facts: VerifyFacts) -> list[str]:
    result = facts.result
    sites = worst_sites(result.sites, WORST_SITES)
    header = ["position", "BN", "direction", "target", "max abs", "max rel", "atol/rtol",
              "worst channels", "verdict"]
    rows = []
    for s in sites:
        name = md_escape(s.bn)
        if s.bn == result.first_divergent_site:
            name = f"**{name}** (first divergent)"
        rows.append([
            str(s.position), name, md_escape(s.direction), md_escape(s.target), fmt(s.max_abs),
            fmt(s.max_rel), f"{fmt(s.atol)} / {fmt(s.rtol)}"
            + (f" (floor {fmt(s.floor_max)})" if s.floor_max is not None else ""),
            md_escape(channels_text(s)) if s.worst_channels else "-",
            f"{PASS_MARK} pass" if s.passed else f"{FAIL_MARK} fail",
        ])
    return _table(header, rows, {0, 4, 5})


def _first_site_line(facts: VerifyFacts) -> str:
    """``**First divergent fold site:** NAME (backward into TARGET, position P): max abs ...``, right
    under the verdict (the site tables list the worst sites, which need not include it); "" when no
    site diverged."""
    s = facts.first_site
    if s is None:
        name = facts.result.first_divergent_site
        return f"**First divergent fold site:** {md_escape(name)}" if name else ""
    label = ("First divergent fold site" if s.bn == facts.result.first_divergent_site
             else "First fold site out of tolerance")
    line = (f"**{label}:** {md_escape(s.bn)} ({md_escape(s.direction)} into {md_escape(s.target)}, position "
            f"{s.position}): max abs {fmt(s.max_abs)}, max rel {fmt(s.max_rel)} (atol {fmt(s.atol)}, rtol "
            f"{fmt(s.rtol)})")
    if s.worst_channels:
        line += f"; worst channels {md_escape(channels_text(s))}"
    return line


def _settings_line(facts: VerifyFacts) -> str:
    items: list[str] = []
    for key, value in facts.settings.items():
        if value is None or isinstance(value, (dict, list)):
            continue
        items.append(f"{md_escape(key)} {md_escape(value)}")
    inputs = facts.inputs
    for key in ("source", "data", "seed", "batch_size", "iterations"):
        if inputs.get(key) is not None:
            items.append(f"{md_escape('inputs.' + key)} {md_escape(inputs[key])}")
    return "**Settings:** " + ("; ".join(items) if items else "defaults")


def markdown_summary(result: VerifyResult, title: str = "bnfold verification",
                     statistics: Sequence[str] | None = None) -> str:
    """The verification as GitHub-flavoured Markdown (ends with a newline). ``statistics``: the
    calibration's lines of a fold (:func:`bnfold.report.summary.statistics_lines`), shown under
    the verdict as a "Calibration" section (how much data, and whether it sufficed)."""
    facts = verify_facts(result)
    lines = [f"## {md_escape(title)}", ""]
    mark = PASS_MARK if result.passed else FAIL_MARK
    word = facts.verdict
    providers = ", ".join(md_escape(p) for p in facts.providers) or "no provider"
    lines.append(
        f"{mark} **{word}** on {providers}: {samples_text(result.samples)}, max abs "
        f"{fmt(result.max_abs)}, max rel {fmt(result.max_rel)}"
    )
    first = _first_site_line(facts)
    if first:
        lines.append("")
        lines.append(first)
    if statistics:
        lines.extend(["", "### Calibration", ""])
        lines.extend(md_escape(line) + ("  " if i < len(statistics) - 1 else "") for i, line in enumerate(statistics))
    lines.append("")
    lines.append(f"Rule: {md_escape(result.rule)}; {md_escape(floor_setting_text(result.settings))}")
    if result.note:
        lines.append("")
        lines.append(md_escape(result.note))
    for run, noise in zip(result.runs, facts.noise):
        lines.append("")
        if run.status != "ran":
            note = f": {md_escape(run.note)}" if run.note else ""
            lines.append(f"### {md_escape(run.provider)} {SKIP_MARK} {md_escape(run.status)}{note}")
            continue
        mark = PASS_MARK if run.passed else FAIL_MARK
        lines.append(f"### {md_escape(run.provider)} {mark}")
        lines.append("")
        lines.append(md_escape(run_label(run)) + (f" ({md_escape(run.note)})" if run.note else ""))
        if run.outputs:
            lines.append("")
            lines.extend(_run_table(run, noise))
    if result.sites:
        failing = len(facts.failing_sites)
        shown = min(WORST_SITES, len(result.sites))
        lines.append("")
        lines.append(
            f"### Fold sites: {failing} of {len(result.sites)} out of tolerance "
            f"(worst {shown} shown)"
        )
        lines.append("")
        lines.extend(_sites_table(facts))
    lines.append("")
    lines.append(_settings_line(facts))
    if result.repro_dir:
        lines.append("")
        lines.append(f"Reproduction files: {md_escape(result.repro_dir)}")
    return "\n".join(lines) + "\n"


def write_markdown(
    result: VerifyResult, path: str | os.PathLike, title: str = "bnfold verification",
    statistics: Sequence[str] | None = None,
) -> None:
    """Write :func:`markdown_summary` to ``path`` atomically."""
    write_text_atomic(markdown_summary(result, title, statistics), path)


def append_github_step_summary(text: str) -> bool:
    """Append ``text`` to the file named by ``$GITHUB_STEP_SUMMARY`` (GitHub Actions' job summary).

    Returns True when it wrote, False when the variable is unset or empty. A blank line separates
    it from what earlier steps wrote.
    """
    target = os.environ.get("GITHUB_STEP_SUMMARY")
    if not target:
        return False
    if not text.endswith("\n"):
        text += "\n"
    with open(target, "a", encoding="utf-8", newline="\n") as fh:
        if fh.tell() > 0:
            text = "\n" + text
        fh.write(text)
    return True
