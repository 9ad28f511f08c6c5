"""Plain-text renderings for the terminal: ``summary_text`` (after ``fold``) and ``plan_table``
(``bnfold inspect``). ASCII only, no colours: the output goes to logs and CI consoles, and a
Windows console with a legacy code page cannot encode a Unicode ellipsis.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from typing import Any

from ..records import Action, Report

__all__ = ["summary_text", "plan_table", "ellipsize"]

ELLIPSIS = "..."


def ellipsize(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters with ``...`` in the middle (keeps both ends of long
    layer names such as ``model.backbone.layer4.2.bn3``)."""
    if len(text) <= width:
        return text
    if width <= len(ELLIPSIS):
        return text[:width]
    keep = width - len(ELLIPSIS)
    head = (keep + 1) // 2
    tail = keep - head
    return text[:head] + ELLIPSIS + (text[-tail:] if tail else "")


def _fmt(x: float) -> str:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.3g}"


def _reason_counts(report: Report, action: Action) -> Counter:
    return Counter(
        b.reason.value if b.reason is not None else "no reason given"
        for b in report.bns
        if b.action is action
    )


def _counts_text(counts: Counter) -> str:
    return ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def summary_text(report: Report) -> str:
    """A few lines: counts (with the reasons BNs were kept), statistics, verification, warnings."""
    lines: list[str] = []
    line = f"BN found {len(report.bns)}: folded {report.folded}, frozen and kept {report.kept}"
    kept_reasons = _reason_counts(report, Action.FROZEN_KEPT)
    if kept_reasons:
        line += f" ({_counts_text(kept_reasons)})"
    lines.append(line)
    notes = Counter(
        b.reason.value for b in report.bns if b.action is Action.FOLDED and b.reason is not None
    )
    if notes:
        lines.append(f"Notes on folded BNs: {_counts_text(notes)}")

    # statistics
    with_stats = [b for b in report.bns if b.stats is not None]
    if report.calibrated and with_stats:
        worst = max(with_stats, key=lambda b: (b.stats.gap if math.isfinite(b.stats.gap) else math.inf))
        batches = max(b.stats.batches for b in with_stats)
        n = report.extra.get("calibration_samples")
        on = f"{n} samples in {batches} batches" if n is not None else f"{batches} batches"
        bs = f", batch size {report.batch_size}" if report.batch_size is not None else ""
        lines.append(
            f"Statistics: estimator {report.estimator}{bs}; {len(with_stats)} BN calibrated on "
            f"{on}; largest estimator gap "
            f"{_fmt(worst.stats.gap)} at {worst.name}"
        )
    elif report.calibrated:
        lines.append(f"Statistics: estimator {report.estimator}; calibrated, no BN needed new statistics")
    else:
        lines.append("Statistics: stored running statistics kept (not calibrated)")

    # verification
    v = report.verification
    if v is None:
        lines.append("Verification: not run")
    else:
        verdict = "PASSED" if v.passed else "FAILED"
        tol = ""
        if v.outputs:
            tols = sorted({(o.dtype, o.atol, o.rtol) for o in v.outputs})
            tol = "; " + ", ".join(f"{d} atol {_fmt(a)} rtol {_fmt(r)}" for d, a, r in tols)
        lines.append(
            f"Verification ({v.provider}, {v.samples} samples): max abs {_fmt(v.max_abs)}, "
            f"max rel {_fmt(v.max_rel)} -> {verdict}{tol}"
        )
        failed = [o.name for o in v.outputs if not o.passed]
        if failed:
            lines.append(f"  outputs out of tolerance: {', '.join(failed)}")
        if v.note:
            lines.append(f"  {v.note}")

    if report.dry_run:
        lines.append("Dry run: no model written")
    elif report.output_path:
        lines.append(f"Wrote {report.output_path}")

    if report.warnings:
        lines.append(f"Warnings ({len(report.warnings)}):")
        lines.extend(f"  - {w}" for w in report.warnings)
    return "\n".join(lines)


# column header, maximum width (None: last column, never padded nor cut)
_COLUMNS: tuple[tuple[str, int | None], ...] = (
    ("BN", 36),
    ("mode", 19),
    ("producer", 36),
    ("action", 11),
    ("target", 36),
    ("reason", None),
)


def _cells(row: Any) -> list[str]:
    mode = getattr(row.mode, "value", row.mode)
    producer = row.producer
    if producer is None:
        prod = "-" if row.producer_op is None else f"({row.producer_op})"
    else:
        prod = f"{producer} ({row.producer_op})" if row.producer_op else producer
    d = row.decision
    target = d.target or "-"
    if d.target and d.direction == "forward":
        target += " [fwd]"
    reason = d.reason.value if d.reason is not None else "-"
    return [row.name, str(mode), prod, getattr(d.action, "value", str(d.action)), target, reason]


def plan_table(rows: Iterable[Any]) -> str:
    """A fixed-width table with columns BN, mode, producer, action, target, reason.

    ``rows`` have attributes ``name``, ``mode`` (Mode), ``producer`` (str | None),
    ``producer_op`` and ``decision`` (FoldDecision). Long names are shortened with ``...`` in the
    middle; columns are separated by two spaces and no line has trailing spaces.
    """
    body = [_cells(r) for r in rows]
    headers = [h for h, _ in _COLUMNS]
    widths: list[int] = []
    for i, (header, cap) in enumerate(_COLUMNS):
        natural = max([len(header)] + [len(cells[i]) for cells in body])
        widths.append(natural if cap is None else min(natural, max(cap, len(header))))

    def render(cells: list[str]) -> str:
        parts = []
        last = len(cells) - 1
        for i, cell in enumerate(cells):
            if i == last:
                parts.append(cell)
            else:
                parts.append(ellipsize(cell, widths[i]).ljust(widths[i]))
        return "  ".join(parts).rstrip()

    lines = [render(headers), render(["-" * w for w in widths])]
    if not body:
        lines.append("(no BatchNormalization nodes)")
    lines.extend(render(cells) for cells in body)
    return "\n".join(lines)
