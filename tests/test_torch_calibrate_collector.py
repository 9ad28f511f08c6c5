"""bnfold.torch.calibrate sets the objects that exist before it aside from Python's cyclic collector
(``gc.freeze``) while it runs (issue 16 point 4): copying the module makes thousands of objects,
enough to start a full collection, which walked every object of the process (40-80 ms on a
ResNet-50 process). The collector keeps running on what the run makes (cyclic garbage of a forward
is freed batch by batch), and its state is restored afterwards."""
from __future__ import annotations

import gc
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

import bnfold.errors  # noqa: E402
import bnfold.torch  # noqa: E402

FREED: list[int] = []


class _Cycle:
    """A reference cycle holding a tensor: only the cyclic collector frees it."""

    def __init__(self, t: Any, k: int) -> None:
        self.me, self.t, self.k = self, t, k

    def __del__(self) -> None:
        FREED.append(self.k)


class _Leaky(nn.Module):
    """A model whose forward leaves a cycle behind on every call, and notes how many of the
    earlier ones were freed by then and whether the old objects were frozen."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.calls = 0
        self.freed_seen: list[int] = []
        self.frozen_seen: list[int] = []

    def forward(self, x: Any) -> Any:
        self.calls += 1
        _Cycle(torch.zeros(1000), self.calls)
        self.freed_seen.append(len(FREED))
        self.frozen_seen.append(gc.get_freeze_count())
        return self.bn(self.conv(x))


def test_old_objects_are_frozen_during_the_run_and_cycles_still_freed() -> None:
    FREED.clear()
    old = gc.get_threshold()
    gc.set_threshold(50, 5, 5)
    try:
        model = _Leaky().train()
        frozen, _ = bnfold.torch.calibrate(model, [torch.randn(2, 3, 8, 8) for _ in range(200)], inplace=True)
    finally:
        gc.set_threshold(*old)
    assert min(frozen.frozen_seen) > 1000  # the process's objects (torch's) were set aside
    assert gc.get_freeze_count() == 0  # and are back
    assert gc.isenabled()
    # the collector still ran: most of the 200 cycles were freed during the run, not at its end
    # (with the collector turned off, none would be: the memory of each batch's cycle piles up)
    assert frozen.freed_seen[-1] > 150


def test_a_caller_s_frozen_objects_and_disabled_collector_are_left_as_they_were() -> None:
    data = [torch.randn(2, 3, 8, 8) for _ in range(2)]
    gc.freeze()
    try:
        before = gc.get_freeze_count()
        bnfold.torch.calibrate(_Leaky().train(), data)
        assert gc.get_freeze_count() > before // 2  # not unfrozen by bnfold (a few were freed since)
    finally:
        gc.unfreeze()
    gc.disable()
    try:
        bnfold.torch.calibrate(_Leaky().train(), data)
        assert not gc.isenabled() and gc.get_freeze_count() == 0
    finally:
        gc.enable()


def test_the_objects_are_unfrozen_after_an_error() -> None:
    with pytest.raises(bnfold.errors.BadInputError):
        bnfold.torch.calibrate(_Leaky().train(), [torch.full((2, 3, 8, 8), float("nan"))])
    assert gc.get_freeze_count() == 0 and gc.isenabled()
