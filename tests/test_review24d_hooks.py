"""review24d: global module hooks and backward hooks keep the BNs they would lose (HOOKED), never a
silently different folded module."""
from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import bnfold.torch as bt  # noqa: E402
from bnfold.records import Reason  # noqa: E402

X = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
BATCHES = [X[i:i + 4] for i in range(0, 16, 4)]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4))


def _fold_and_frozen(m: nn.Module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = bt.fold(m, BATCHES)
        frozen, _ = bt.calibrate(m, BATCHES)
    with torch.no_grad():
        return res, res.module(X), frozen(X)


def test_global_forward_hook_keeps_bns() -> None:
    from torch.nn.modules.module import register_module_forward_hook
    handle = register_module_forward_hook(lambda mod, i, o: o * 2 if isinstance(mod, nn.BatchNorm2d) else None)
    try:
        res, got, want = _fold_and_frozen(_model())
    finally:
        handle.remove()
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
    assert [b.reason for b in res.report.bns] == [Reason.HOOKED, Reason.HOOKED]
    assert "global module forward hooks" in res.report.bns[0].detail


def test_backward_hook_on_bn_keeps_it() -> None:
    m = _model()
    calls: list[int] = []
    m[1].register_full_backward_hook(lambda mod, gi, go: calls.append(1))
    res, got, want = _fold_and_frozen(m)
    assert [(b.name, b.reason) for b in res.report.bns] == [("1", Reason.HOOKED), ("4", None)]
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
    x = X.clone().requires_grad_(True)
    res.module(x).sum().backward()
    assert calls  # the user's backward hook still runs in the folded module
    assert len(m[1]._backward_hooks) == 1  # and stays on the input module
