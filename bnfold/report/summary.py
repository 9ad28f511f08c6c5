"""Plain-text renderings for the terminal: ``summary_text`` (after ``fold``), ``verify_summary_text``
(after ``verify``) and ``plan_table`` (``bnfold inspect``). The number formatting here is shared by
the other renderers (JUnit, Markdown, HTML); the facts they show come from ``report.facts``.

ASCII only, no colours: the output goes to logs and CI consoles, and a Windows console with a
legacy code page cannot encode a Unicode ellipsis.
"""
from __future__ import annotations

import math
import numbers
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from bnfold.formulas.drift import LOG_VAR_RATIO_FLAG, MEAN_SHIFT_FLAG, flagged
from bnfold.formulas.sufficiency import summary_line
from bnfold.records import Action, Drift
from bnfold.report.facts import verify_facts
from bnfold.run_records import BnRecord, OutputMetrics, ProviderRun, Report, SiteResult, VerifyResult

__all__ = ["summary_text", "verify_summary_text", "statistics_lines", "plan_table", "drift_table", "ellipsize",
           "elide_apart", "candidate_failures"]

ELLIPSIS = "..."
#: how the note of a provider run begins when the candidate could not run (verification.engine)
CANDIDATE_FAILED = "candidate failed to run"


def shown(text: str) -> str:
    """``text`` with each unprintable character (a line break, ESC, another control) written as its
    Python escape (``bn\\nx``): a name from the model never splits a summary line or a table row,
    and never reaches the terminal raw. Letters of any script stay as they are."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def controls_escaped(text: str) -> str:
    """``text`` with each control character a document must not hold (C0 but tab, line feed and
    carriage return; DEL; C1) written as its Python escape (``\\x1b``, ``\\x00``): HTML forbids
    them, and ESC would reach a terminal that prints the file raw. Line breaks stay."""
    return "".join(repr(c)[1:-1] if (ord(c) < 0x20 and c not in "\t\n\r") or 0x7F <= ord(c) <= 0x9F else c
                   for c in text)


def _joined(lines: Iterable[str]) -> str:
    return "\n".join(shown(line) for line in lines)


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


def elide_apart(names: Iterable[str], width: int) -> dict[str, str]:
    """Each name cut to ``width`` characters with ``...`` in the middle, like :func:`ellipsize`, but
    keeping the parts that tell the names apart: where the even split makes two long names read the
    same (``/stages/stages.0/...tchNormalization`` for ``.../bn1/...`` and ``.../bn2/...``), the cut
    moves (``/stages/stages.0/bn1...ormalization``) to the split nearest the middle at which no
    other name has the same head and tail. Names that fit are kept whole.

    Linear in the number of names per split tried: the (head, tail) pairs of all long names at a
    split are counted once, so names sharing a long common prefix do not cost a scan each."""
    unique = sorted(set(names))
    keep = width - len(ELLIPSIS)
    long_names = [n for n in unique if len(n) > width]
    pairs: dict[int, Counter] = {}

    def ends(name: str, head: int) -> tuple[str, str]:
        tail = keep - head
        return name[:head], (name[len(name) - tail:] if tail else "")

    def clashes(name: str, head: int) -> bool:
        counts = pairs.get(head)
        if counts is None:
            counts = pairs[head] = Counter(ends(n, head) for n in long_names)
        return counts[ends(name, head)] > 1  # the names are unique: more than one is another name

    out: dict[str, str] = {}
    for name in unique:
        if len(name) <= width or width <= len(ELLIPSIS):
            out[name] = ellipsize(name, width)
            continue
        middle = (keep + 1) // 2
        splits = sorted(range(keep + 1), key=lambda h: (abs(h - middle), -h))
        head = next((h for h in splits if not clashes(name, h)), middle)
        start, end = ends(name, head)
        out[name] = start + ELLIPSIS + end
    return out


def fmt(x: Any) -> str:
    """A number for people: 3 significant digits, ``inf``/``-inf``/``nan`` spelled out, ``-`` for
    None. Integers are written in full."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, numbers.Integral):
        return str(int(x))
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.3g}"



def fmt_cosine(x: float | None) -> str:
    """Cosine similarity: close to 1 is what matters, so 6 significant digits."""
    if x is None:
        return "-"
    v = float(x)
    if not math.isfinite(v):
        return fmt(v)
    if 0.99999 < v < 1.0:  # "1 - 7.9e-13": how far from identical, which 6 digits would hide
        return f"1-{1.0 - v:.2g}"
    return f"{v:.6g}"


def fmt_pct(x: float | None) -> str:
    """A percentage (``x`` already in percent)."""
    return "-" if x is None else f"{fmt(x)}%"


def fmt_fraction(x: float | None) -> str:
    """A fraction in [0, 1] (top-1 agreement) as a percentage."""
    return "-" if x is None else fmt_pct(100.0 * float(x))


def samples_text(n: int) -> str:
    return f"{n} sample" if n == 1 else f"{n} samples"


def channels_text(site: SiteResult) -> str:
    """``"3 (0.25), 7 (0.1)"``: the worst channels with their max abs error."""
    return ", ".join(f"{c} ({fmt(v)})" for c, v in site.worst_channels)


def output_figures(o: OutputMetrics, noise: float | None = None) -> str:
    """One output's figures on one line (used by the summary and the JUnit failure message)."""
    parts = [f"max abs {fmt(o.max_abs)}"]
    if noise is not None:
        parts[0] += f" (noise floor {fmt(noise)})"
    parts.append(f"p99 abs {fmt(o.p99_abs)}")
    parts.append(f"max rel {fmt(o.max_rel)}")
    parts.append(f"mismatches {o.mismatches}/{o.elements} ({fmt_pct(o.mismatch_pct)})")
    if o.cosine is not None:
        parts.append(f"cosine {fmt_cosine(o.cosine)}")
    if o.snr_db is not None:
        parts.append(f"SNR {fmt(o.snr_db)} dB")
    if o.max_ulp is not None:
        parts.append(f"max ULP {o.max_ulp}")
    if o.top1 is not None:
        parts.append(f"top-1 {fmt_fraction(o.top1)}")
    if o.top5 is not None:
        parts.append(f"top-5 {fmt_fraction(o.top5)}")
    return ", ".join(parts)


def tolerance_text(o: OutputMetrics) -> str:
    stat = o.error_stat
    if stat == "quantile" and o.quantile is not None:
        stat = f"q{fmt(o.quantile)}"
    if o.atol == 0 and o.rtol == 0 and stat == "max" and o.floor_max is None:
        return "exact"
    text = f"atol {fmt(o.atol)}, rtol {fmt(o.rtol)}"
    if o.floor_max is not None:
        text += f", noise floor {fmt(o.floor_max)}"
    return text if stat == "max" else f"{text} on {stat}"


def floor_setting_text(settings: Mapping[str, Any]) -> str:
    """``"noise floor: perturbation, margin 4"`` / ``"noise floor: off"`` from ``VerifyResult.settings``."""
    nf = settings.get("noise_floor")
    if not isinstance(nf, Mapping):
        return "noise floor: off (strict tolerance rule)" if nf == "off" else "noise floor: not recorded"
    text = f"noise floor: {nf.get('method')}, margin {fmt(nf.get('margin'))}"
    if nf.get("draws"):
        text += f" ({nf['draws']} draws)"
    return text + (f"; {nf['note']}" if nf.get("note") else "")


def run_label(run: ProviderRun) -> str:
    """``"ran on CUDAExecutionProvider, CPUExecutionProvider"`` / ``"skipped"``."""
    if run.status != "ran":
        return run.status
    used = ", ".join(run.used) if run.used else "no provider recorded"
    return f"ran on {used}"


def _shapes_line(v: VerifyResult) -> str | None:
    """``  Verified at x: 1x3x224x224 (probe)`` when an input's shape was not the model's declared one
    (``verification.inputs.shapes``, see ``bnfold.verification.shapes``)."""
    shapes = v.inputs.get("shapes")
    if not isinstance(shapes, dict) or all(s.get("source") == "declared" for s in shapes.values()):
        return None
    return "  Verified at " + ", ".join(f"{name}: {'x'.join(str(d) for d in s.get('shape', ())) or '[]'} "
                                        f"({s.get('source')})" for name, s in shapes.items())


def candidate_failures(v: VerifyResult) -> list[str]:
    """``"the candidate failed to run on cpu (verification batch 0): REASON"`` for every provider on
    which the candidate could not run: a run that ran and compared no outputs, its note saying why."""
    out = []
    for run in v.ran:
        if not run.outputs:
            _, _, why = (run.note or CANDIDATE_FAILED).partition(CANDIDATE_FAILED)
            out.append(f"the {CANDIDATE_FAILED} on {run.provider}{why or ' (no reason recorded)'}")
    return out


def _verification_lines(v: VerifyResult, max_outputs: int = 10) -> list[str]:
    facts = verify_facts(v)
    providers = ", ".join(facts.providers) or "no provider"
    if v.ran and len(candidate_failures(v)) == len(v.ran):  # no figures: "max abs 0" would be a lie
        figures = "the candidate failed to run"
    else:
        figures = f"max abs {fmt(v.max_abs)}, max rel {fmt(v.max_rel)}"
    lines = [f"Verification ({providers}, {samples_text(v.samples)}): {figures} -> {facts.verdict}"]
    if "noise_floor" in v.settings:  # a record from this verifier (older ones have no floor)
        lines.append(f"  Rule: {v.rule}; {floor_setting_text(v.settings)}")
    shapes_line = _shapes_line(v)
    if shapes_line:
        lines.append(shapes_line)
    for run, noise in zip(v.runs, facts.noise):
        head = f"  {run.provider}: {run_label(run)}"
        if run.status == "ran":
            head += " -> " + ("passed" if run.passed else "FAILED")
        if run.note:
            head += f" ({run.note})"
        lines.append(head)
        for o in run.outputs[:max_outputs]:
            mark = "ok" if o.passed else "FAIL"
            lines.append(
                f"    {o.name} [{o.dtype}]: {output_figures(o, noise.get(o.name))} -> {mark} "
                f"({tolerance_text(o)})"
            )
        if len(run.outputs) > max_outputs:
            lines.append(f"    ... and {len(run.outputs) - max_outputs} more output(s)")
    if v.sites:
        first = facts.first_site
        if first is not None:
            line = (
                f"  First divergent fold site: {first.bn} ({first.direction} into {first.target}, "
                f"tensor {first.tensor}, position {first.position}): max abs {fmt(first.max_abs)}, "
                f"max rel {fmt(first.max_rel)} (atol {fmt(first.atol)}, rtol {fmt(first.rtol)}"
                + (f", noise floor {fmt(first.floor_max)})" if first.floor_max is not None else ")")
            )
            if first.worst_channels:
                line += f"; worst channels {channels_text(first)}"
            lines.append(line)
            lines.append(f"  Fold sites: {len(facts.failing_sites)} of {len(v.sites)} out of tolerance")
        else:
            lines.append(f"  Fold sites: all {len(v.sites)} within tolerance")
    elif v.first_divergent_site:
        lines.append(f"  First divergent fold site: {v.first_divergent_site}")
    if v.note:
        lines.append(f"  {v.note}")
    if v.repro_dir:
        lines.append(f"  Reproduction files: {v.repro_dir}")
    return lines


def verify_summary_text(result: VerifyResult) -> str:
    """A few lines for the terminal after ``bnfold verify``: the verdict, each provider (ran or
    skipped, and the providers it really used), each output's figures with the noise floor when
    there is one, and the first divergent fold site with its worst channels."""
    return _joined(_verification_lines(result))


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

    lines.extend(statistics_lines(report))

    # verification
    v = report.verification
    if v is None:
        lines.append("Verification: not run")
    else:
        lines.extend(_verification_lines(v))

    if report.dry_run:
        lines.append("Dry run: no model written")
    elif report.output_path:
        lines.append(f"Wrote {report.output_path}")

    if report.warnings:
        lines.append(f"Warnings ({len(report.warnings)}):")
        lines.extend(f"  - {w}" for w in report.warnings)
    return _joined(lines)


def statistics_lines(report: Report) -> list[str]:
    """The calibration's lines of the summary: estimator and data, which BNs were calibrated, the
    drift of re-estimated ones, and whether the data sufficed (also the Markdown and HTML reports')."""
    lines: list[str] = []
    with_stats = [(b, b.stats) for b in report.bns if b.stats is not None]
    if report.calibrated and with_stats:
        worst, worst_stats = max(with_stats, key=lambda bs: (bs[1].gap if math.isfinite(bs[1].gap) else math.inf))
        batches = max(s.batches for _, s in with_stats)
        n = report.extra.get("calibration_samples")
        on = f"{n} samples in {batches} batches" if n is not None else f"{batches} batches"
        bs = f", batch size {report.batch_size}" if report.batch_size is not None else ""
        kept_stored = len(report.bns) - len(with_stats)
        if report.recalibrate == "all":
            which = f"all {len(with_stats)} BN re-estimated (--recalibrate all: stored statistics replaced)"
        else:
            which = f"{len(with_stats)} BN calibrated"
            if kept_stored:
                which += (f" ({kept_stored} inference BN keep their stored statistics; --recalibrate all "
                          "re-estimates them)")
        lines.append(
            f"Statistics: estimator {report.estimator}{bs}; {which} on "
            f"{on}; largest estimator gap "
            f"{fmt(worst_stats.gap)} at {worst.name}"
        )
        lines.extend(_drift_lines(report.bns))
        suff = summary_line([(b.name, s.sufficiency) for b, s in with_stats if s.sufficiency is not None])
        if suff:
            lines.append(suff)
    elif report.calibrated:
        served = "verification" if report.verification is not None else "as the export's example inputs"
        lines.append(f"Statistics: no BN normalises with batch statistics, so all {len(report.bns)} keep their "
                     f"stored statistics (--recalibrate all re-estimates them); the data served {served}")
    else:
        lines.append("Statistics: stored running statistics kept (not calibrated)")
    return lines


def _drift_lines(bns: list[BnRecord]) -> list[str]:
    """The drift of the re-estimated BNs' stored statistics (``--recalibrate all``), on two lines."""
    rated = [(b, b.drift) for b in bns if b.drift is not None and b.drift.mean_shift_sigma_max is not None]
    if not rated:
        return []
    shift_bn, shift = max(rated, key=lambda bd: _key(bd[1].mean_shift_sigma_max))
    var_bn, var = max(rated, key=lambda bd: _key(bd[1].log_var_ratio_max))
    over = [b.name for b, d in rated if flagged(d)]
    line = (f"  Drift of the stored statistics: largest mean shift {fmt(shift.mean_shift_sigma_max)} sigma at "
            f"{shift_bn.name}, largest |ln var ratio| {fmt(var.log_var_ratio_max)} at {var_bn.name}; "
            f"{len(over)} of {len(rated)} BN over {fmt(MEAN_SHIFT_FLAG)} sigma / {fmt(LOG_VAR_RATIO_FLAG)}")
    if over:
        line += ": " + ", ".join(over[:5]) + (f" and {len(over) - 5} more" if len(over) > 5 else "")
    return [line]


def _key(v: float | None) -> float:
    if v is None:
        return -1.0
    return math.inf if math.isnan(v) else v


def drift_cells(d: Drift | None) -> tuple[str, str, str, str]:
    """(mean shift, |ln var ratio|, worst channel, flag or note) of one drift record."""
    if d is None:
        return "-", "-", "-", ""
    if d.mean_shift_sigma_max is None:
        return "-", "-", "-", d.note
    return (fmt(d.mean_shift_sigma_max), fmt(d.log_var_ratio_max), fmt(d.worst_channel),
            "DRIFT" if flagged(d) else "ok")


def drift_table(rows: Iterable[Any]) -> str:
    """``bnfold inspect --data``'s drift table: per BN the mean shift (in sigma of the data), the
    |ln var ratio|, the worst channel, and ``DRIFT`` where a figure is over its threshold
    (``bnfold.formulas.drift``: 0.1 sigma, 0.2) or the note of a BN without stored statistics.
    ``rows`` have ``name`` and ``drift`` (``bnfold.api.BnInspection``)."""
    rows = list(rows)
    body = [[shown(r.name), *drift_cells(r.drift)] for r in rows]
    headers = ["BN", "mean shift (sigma)", "|ln var ratio|", "worst ch", "drift"]
    widths = [min(max([len(headers[0])] + [len(c[0]) for c in body]), 48)]
    widths += [max([len(h)] + [len(c[i]) for c in body]) for i, h in enumerate(headers[1:4], start=1)]

    def render(cells: list[str]) -> str:
        head = [ellipsize(cells[0], widths[0]).ljust(widths[0])]
        head += [cells[i].rjust(widths[i]) for i in (1, 2, 3)]
        return "  ".join(head + [cells[4]]).rstrip()

    flagged_n = sum(1 for r in rows if flagged(r.drift))
    rated = sum(1 for r in rows if r.drift is not None and r.drift.mean_shift_sigma_max is not None)
    lines = [render(headers), render(["-" * w for w in widths] + ["-----"])]
    lines.extend(render(c) for c in body)
    unrated = f"; {len(body) - rated} BN without figures (see their notes)" if rated < len(body) else ""
    lines.append(f"{flagged_n} of {rated} BN over the drift thresholds (mean shift > {fmt(MEAN_SHIFT_FLAG)} "
                 f"sigma or |ln var ratio| > {fmt(LOG_VAR_RATIO_FLAG)}; README, \"Drift of stored statistics\")"
                 + unrated)
    return _joined(lines)


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
    cells = [row.name, str(mode), prod, getattr(d.action, "value", str(d.action)), target, reason]
    return [shown(c) for c in cells]


def plan_table(rows: Iterable[Any]) -> str:
    """A fixed-width table with columns BN, mode, producer, action, target, reason.

    ``rows`` have attributes ``name``, ``mode`` (Mode), ``producer`` (str | None),
    ``producer_op`` and ``decision`` (FoldDecision). Long names are shortened with ``...`` where
    they still read apart (:func:`elide_apart`); columns are separated by two spaces and no line has
    trailing spaces.
    """
    body = [_cells(r) for r in rows]
    headers = [h for h, _ in _COLUMNS]
    widths: list[int] = []
    for i, (header, cap) in enumerate(_COLUMNS):
        natural = max([len(header)] + [len(cells[i]) for cells in body])
        widths.append(natural if cap is None else min(natural, max(cap, len(header))))
    # per column, names elided so that different names read differently; where no single cut at the
    # column's cap keeps them apart (the differences spread over more than the cap), the column widens
    shown = []
    for i in range(len(_COLUMNS) - 1):
        column = [cells[i] for cells in body]
        natural = max([0] + [len(c) for c in column])
        elided = elide_apart(column, widths[i])
        if len(set(elided.values())) < len(elided) and widths[i] < natural:
            # the narrowest width cap + 4k (or natural) at which the names read apart, by bisection:
            # a step of 4 at a time re-elided the column once per step (10 kB names: minutes)
            base = widths[i]
            lo, hi = 0, -(-(natural - base) // 4)  # k = hi gives natural: every name whole, apart
            best = None
            while lo < hi:
                mid = (lo + hi) // 2
                trial = elide_apart(column, min(natural, base + 4 * mid))
                if len(set(trial.values())) == len(trial):
                    hi, best = mid, trial
                else:
                    lo = mid + 1
            widths[i] = min(natural, base + 4 * hi)
            elided = best if best is not None else elide_apart(column, widths[i])
        shown.append(elided)

    def render(cells: list[str], elided: bool = True) -> str:
        parts = []
        last = len(cells) - 1
        for i, cell in enumerate(cells):
            if i == last:
                parts.append(cell)
            else:
                text = shown[i].get(cell, cell) if elided else ellipsize(cell, widths[i])
                parts.append(text.ljust(widths[i]))
        return "  ".join(parts).rstrip()

    lines = [render(headers, False), render(["-" * w for w in widths], False)]
    if not body:
        lines.append("(no BatchNormalization nodes)")
    lines.extend(render(cells) for cells in body)
    return _joined(lines)
