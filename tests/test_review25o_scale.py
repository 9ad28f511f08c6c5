"""Review 25o (scale): report helpers whose work grew with the square of the number of BNs / outputs.

Counted operations where they can be counted (the plot), best-of-3 time ratios otherwise; each fails before the fix by a ratio of ~4 between n and 2n.
"""
from __future__ import annotations

import time

from bnfold.report.html_plots import outputs_svg
from bnfold.report.summary import elide_apart
from bnfold.run_records import ProviderRun
from tests.report_builders import make_metrics


class _Counted(str):
    """A str that counts the method calls made on it (slices, prefix/suffix tests, hashes)."""

    calls = 0

    def __getitem__(self, key):  # type: ignore[override]
        _Counted.calls += 1
        return str.__getitem__(self, key)

    def startswith(self, *a):  # type: ignore[override]
        _Counted.calls += 1
        return str.startswith(self, *a)

    def endswith(self, *a):  # type: ignore[override]
        _Counted.calls += 1
        return str.endswith(self, *a)

    def __hash__(self):
        _Counted.calls += 1
        return str.__hash__(self)


def _elide_seconds(n: int) -> float:
    # onnx-export style names: a long shared prefix, the difference in the middle (inspect's BN column)
    names = [f"/model/backbone/stage/blocks/layer_bn{i}/norm/BatchNormalization_op" for i in range(n)]
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        out = elide_apart(names, 36)
        best = min(best, time.perf_counter() - t0)
    assert len(set(out.values())) == n  # still told apart
    return best


def test_elide_apart_is_not_quadratic_in_names_sharing_a_prefix():
    # before: every split tried copied the tail of the sorted name list (a slice per lookup), so
    # inspect on 4000 such BNs took 7.9 s against 1.9 s after. 32x the names took 232x the time
    # before (quadratic), 34x after (linear; measured best-of-3 on the 2-core dev machine): the
    # bound leaves ~3x of room for a loaded machine either way
    small, large = _elide_seconds(125), _elide_seconds(4000)
    assert large < 100 * small, (small, large)


def _svg_hashes(n: int) -> int:
    metrics = tuple(make_metrics(f"out{i}") for i in range(n))
    run = ProviderRun(provider=_Counted("cpu"), status="ran", used=("CPUExecutionProvider",), passed=True,
                      outputs=metrics)
    _Counted.calls = 0
    outputs_svg([run])
    return _Counted.calls


def test_outputs_plot_is_not_quadratic_in_outputs():
    # before: the set of providers was rebuilt for every (provider, output) bar group
    small, large = _svg_hashes(100), _svg_hashes(200)
    assert large < 3 * small, (small, large)


def test_plan_table_widens_long_names_in_few_elisions(monkeypatch):
    # names that differ only in the middle of 1 kB: no cut at the column's cap keeps them apart, so
    # the column widens. Before: one re-elision of the whole column per 4 characters (~250 here;
    # 10 kB names made 'bnfold inspect' run for minutes); after: a bisection over the widths.
    from collections import namedtuple

    import bnfold.report.summary as summary
    from bnfold.records import Action, Mode
    from bnfold.run_records import FoldDecision

    row = namedtuple("row", "name mode producer producer_op decision")
    names = ["A" * 1000 + f"bn{i}" + "B" * 1000 for i in range(3)]
    rows = [row(n, Mode.INFERENCE, None, None, FoldDecision(n, Action.FOLDED, target="c", direction="forward"))
            for n in names]
    calls = []
    real = summary.elide_apart
    monkeypatch.setattr(summary, "elide_apart", lambda column, width: calls.append(width) or real(column, width))
    table = summary.plan_table(rows)
    assert len({line.split('  ')[0] for line in table.splitlines()[2:]}) == 3  # BN cells read apart
    assert len(calls) < 40, len(calls)
