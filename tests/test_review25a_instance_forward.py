"""Review 25a: a BatchNorm2d whose forward is replaced on the instance (``bn.forward =
types.MethodType(f, bn)``, as accelerate's hooks do) was classed by its class's forward: the
calibration pass put its own forward in the instance's ``__dict__`` and popped it after, so the
calibrated copy (and, with ``inplace=True``, the module itself) lost the user's forward, and ``fold``
folded the plain BN, dropping the forward's extra math. It is now a BN bnfold cannot see through:
calibrated through its ``F.batch_norm`` call and kept (``UNKNOWN_BN_FORWARD``)."""
from __future__ import annotations

import types

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import bnfold.torch  # noqa: E402
from bnfold.records import Action, Reason  # noqa: E402


def _scaled(self: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    return 2.0 * nn.BatchNorm2d.forward(self, x)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    net[1].forward = types.MethodType(_scaled, net[1])
    return net


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 3, 8, 8, generator=g) for _ in range(3)]


def _reference(frozen: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    bn = frozen[1]
    return 2.0 * F.batch_norm(frozen[0](x), bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def test_calibrate_keeps_the_instance_forward() -> None:
    net = _net()
    frozen, stats = bnfold.torch.calibrate(net, _batches())
    assert list(stats) == ["1"]
    assert "forward" in net[1].__dict__ and "forward" in frozen[1].__dict__
    x = _batches()[0]
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), _reference(frozen, x))


def test_inplace_calibration_keeps_the_instance_forward() -> None:
    net = _net()
    bnfold.torch.calibrate(net, _batches(), inplace=True)
    assert "forward" in net[1].__dict__
    x = _batches()[0]
    with torch.no_grad():
        torch.testing.assert_close(net(x), _reference(net, x))


def test_fold_keeps_it_with_a_reason() -> None:
    net = _net()
    frozen, _ = bnfold.torch.calibrate(net, _batches())
    res = bnfold.torch.fold(net, _batches())
    [rec] = res.report.bns
    assert rec.action is not Action.FOLDED and rec.reason is Reason.UNKNOWN_BN_FORWARD
    x = _batches()[0]
    with torch.no_grad():
        torch.testing.assert_close(res.module(x), _reference(frozen, x), rtol=1e-5, atol=1e-5)
