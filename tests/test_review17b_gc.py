"""review17b: the collector paused during bnfold.torch.calibrate must not let a forward's reference
cycles pile up for the whole calibration (memory growing with the number of batches)."""
from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

import torch
from torch import nn

import bnfold.torch as bt


class _Cycle:
    alive = 0

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t
        self.me = self  # a reference cycle: only the cyclic collector frees it
        _Cycle.alive += 1

    def __del__(self) -> None:
        _Cycle.alive -= 1


class _CyclicForward(nn.Module):
    """A forward that leaves a reference cycle holding an activation behind, every batch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.most_alive = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        _Cycle(y.detach().clone())
        self.most_alive = max(self.most_alive, _Cycle.alive)
        return self.bn(y)


def _batches(n: int) -> Iterator[torch.Tensor]:
    for _ in range(n):
        yield torch.randn(2, 3, 4, 4)


@contextlib.contextmanager
def _collector(*threshold: int, enabled: bool = True) -> Iterator[None]:
    """A clean collector with ``threshold`` (and switched off unless ``enabled``) for the block; as
    it was after."""
    old = gc.get_threshold()
    gc.collect()
    gc.set_threshold(*threshold)
    if not enabled:
        gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.set_threshold(*old)


def test_cycles_made_by_the_forward_are_collected_during_a_long_calibration() -> None:
    # Before the fix all 300 cycles (with their activations) were alive at the last batch: the
    # collector was off for the whole pass. A threshold of 100 allocations makes a young collection
    # come every few dozen batches (a forward allocates a handful of tracked objects); 150 leaves
    # room for the copy's objects counted first, and is half the 300 that fail.
    torch.manual_seed(0)
    model = _CyclicForward().train()
    with _collector(100, 10, 10):
        bt.calibrate(model, _batches(300), inplace=True)
        assert gc.isenabled()
    assert model.most_alive < 150, model.most_alive


def test_a_collector_switched_off_by_threshold_zero_stays_off() -> None:
    # threshold 0 is the other way to switch collection off: a caller that chose it gets no collection
    torch.manual_seed(0)
    model = _CyclicForward().train()
    old = gc.get_threshold()
    gc.collect()
    start = _Cycle.alive
    gc.set_threshold(0)
    try:
        bt.calibrate(model, _batches(50), inplace=True)
        assert _Cycle.alive - start == 50
    finally:
        gc.set_threshold(*old)
        gc.collect()


def test_with_the_collector_switched_off_around_the_run_cycles_are_still_collected() -> None:
    # the CLI switches the collector off for the whole command (cli/gcpause.py): the batch loop then
    # makes the young collections itself (collect_young), so the cycles do not pile up either
    torch.manual_seed(0)
    model = _CyclicForward().train()
    with _collector(100, 10, 10, enabled=False):
        bt.calibrate(model, _batches(300), inplace=True)
    assert model.most_alive < 150, model.most_alive
