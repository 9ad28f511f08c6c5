"""bnfold.torch.calibrate pauses Python's cyclic garbage collector while it runs (issue 16 point 4):
copying the module makes thousands of objects, enough to start a full collection (40-80 ms on a
ResNet-50 process) during the forward passes; the collector's state is restored afterwards."""
from __future__ import annotations

import gc
import traceback
from collections.abc import Iterator

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

import bnfold.torch  # noqa: E402


@pytest.fixture()
def eager_collector() -> Iterator[list[int]]:
    """Collections that start inside the calibration pass (copy, forward passes, merge), with
    thresholds so low that such a pass with the collector on makes dozens."""
    seen: list[int] = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and any(f.name == "_calibration_pass" for f in traceback.extract_stack()):
            seen.append(info["generation"])

    old = gc.get_threshold()
    gc.callbacks.append(count)
    gc.set_threshold(10, 1, 1)
    try:
        yield seen
    finally:
        gc.set_threshold(*old)
        gc.callbacks.remove(count)


def _net() -> nn.Module:
    return nn.Sequential(*[m for _ in range(6) for m in (nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))]).train()


def test_no_collection_runs_during_calibrate_and_the_state_is_restored(eager_collector: list[int]) -> None:
    data = [torch.randn(2, 4, 8, 8) for _ in range(3)]
    assert gc.isenabled()
    bnfold.torch.calibrate(_net(), data)
    # with the collector on: 58 collections (thresholds 10, 1, 1), full ones among them. Paused: no full
    # (generation 2) one, and at most one young collection per batch (review17b: a forward's reference
    # cycles are freed batch by batch instead of piling up for the whole calibration)
    assert 2 not in eager_collector and len(eager_collector) <= len(data), eager_collector
    assert gc.isenabled()
    gc.disable()
    try:
        bnfold.torch.calibrate(_net(), data)
        assert not gc.isenabled()  # a caller's disabled collector stays disabled
    finally:
        gc.enable()


def test_the_collector_is_back_on_after_an_error(eager_collector: list[int]) -> None:
    with pytest.raises(bnfold.errors.BadInputError):
        bnfold.torch.calibrate(_net(), [torch.full((2, 4, 8, 8), float("nan"))])
    assert gc.isenabled()
