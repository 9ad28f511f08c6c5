"""bnfold.torch.heap: glibc keeps a freed activation's pages for the next batch after a calibration starts.

What is measured is the kernel's count of minor page faults while a miniature batch of
activations (eight 4 MiB tensors) is filled, in the rounds after the first (the fewest of five):
where glibc gave the last round's 32 MiB back (glibc's own adjustment has raised its trim threshold
to only twice 4 MiB by then), all 8192 pages fault in again; where it kept them, none do. Each case runs in a fresh interpreter, whose glibc starts with the default thresholds.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")

from bnfold.torch import heap  # noqa: E402

glibc_only = pytest.mark.skipif(not heap._glibc(), reason="glibc's malloc thresholds (Linux with glibc)")

PROBE = textwrap.dedent('''
    import resource, sys
    import torch
    from torch import nn
    import bnfold.torch
    from bnfold.torch.heap import settle_heap

    def faults_of_a_later_batch():
        """A batch's activations in miniature: eight 4 MiB tensors, filled, then all freed."""
        faults = []
        for _ in range(6):
            ts = [torch.empty(1 << 20) for _ in range(8)]
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for t in ts:
                t.fill_(1.0)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
            del ts, t
        return min(faults[1:])  # the first batch's pages are new either way

    torch.ones(1 << 20).add_(1)  # torch's worker threads start now, not in the middle of the probe
    how = sys.argv[1]
    if how == "settle":
        print("settled", settle_heap(), settle_heap())
    elif how == "calibrate":
        net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
        bnfold.torch.calibrate(net, [torch.randn(2, 3, 8, 8)])
    print("faults", faults_of_a_later_batch())
''')


def probe(how: str) -> dict[str, str]:
    done = subprocess.run([sys.executable, "-c", PROBE, how], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in done.stdout.splitlines()}


@pytest.mark.slow
@glibc_only
def test_without_it_a_later_batch_faults_in_again():
    """The premise, so that the tests below have teeth: a fresh process gives a freed batch back
    and faults it in again (not every time: another allocation left at the heap's top now and then
    keeps glibc from trimming below it). Where no process shows it, that is the interpreter's heap,
    not bnfold: a fresh CI clone importing bnfold from sources it compiles (no bytecode written)
    once kept the freed batch in all three processes. The premise is then skipped, saying so; the
    settle's tests below still hold there, without a difference to show."""
    seen = [int(probe("nothing")["faults"]) for _ in range(3)]
    if max(seen) < 8000:
        pytest.skip(f"this interpreter's heap kept a freed batch without the settle (faults {seen}): "
                    "the premise cannot be shown here")
    assert max(seen) >= 8000


@glibc_only
def test_settled_a_later_batch_reuses_the_last_ones_pages():
    out = probe("settle")
    assert out["settled"] == "True False"  # once per process
    assert int(out["faults"]) < 100


@glibc_only
def test_a_cpu_calibration_settles_the_heap():
    assert int(probe("calibrate")["faults"]) < 100


def test_does_nothing_without_glibc(monkeypatch):
    def no_confstr(name):
        raise ValueError("unrecognized configuration name")

    monkeypatch.setattr(heap, "_DONE", [False])
    monkeypatch.setattr(heap.os, "confstr", no_confstr)
    assert heap.settle_heap() is False
    assert heap._DONE == [True]  # and is not tried again
