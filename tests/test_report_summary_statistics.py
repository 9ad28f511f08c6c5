"""bnfold.report.summary: the statistics line of ``summary_text`` (the largest estimator gap, a
non-finite one ranking above every finite one; most batches over the calibrated BNs; BNs without
statistics left out)."""
from __future__ import annotations

import dataclasses

from report_builders import make_report, make_stats

from bnfold.report.summary import summary_text


def _statistics_line(text: str) -> str:
    (line,) = [l for l in text.splitlines() if l.startswith("Statistics:")]
    return line


def test_statistics_line_ranks_a_nan_gap_largest_and_takes_the_most_batches() -> None:
    report = make_report()
    bn1, bn2, kept = report.bns
    bns = [
        dataclasses.replace(bn1, stats=dataclasses.replace(make_stats(0.25), batches=7)),
        dataclasses.replace(bn2, stats=make_stats(float("nan"))),
        kept,  # no statistics: not counted
    ]
    line = _statistics_line(summary_text(make_report(bns=bns, extra={})))
    assert line == ("Statistics: estimator unbiased, batch size 32; 2 BN calibrated (1 inference BN keep their "
                    "stored statistics; --recalibrate all re-estimates them) on 7 batches; "
                    "largest estimator gap nan at layer1.0.bn2")


def test_statistics_line_with_an_infinite_gap_names_that_bn() -> None:
    report = make_report()
    bn1, bn2, kept = report.bns
    bns = [dataclasses.replace(bn1, stats=make_stats(float("inf"))), bn2, kept]  # bn2's gap is 0.5
    line = _statistics_line(summary_text(make_report(bns=bns, extra={"calibration_samples": 96})))
    assert line.endswith("2 BN calibrated (1 inference BN keep their stored statistics; --recalibrate all "
                         "re-estimates them) on 96 samples in 3 batches; largest estimator gap inf at layer1.0.bn1")
