"""Review 25a: a Conv or Linear whose forward is set on the instance (``conv.forward =
types.MethodType(f, conv)``) is a leaf of the fx trace and was taken for a plain producer: the BN was
folded into its weights while the instance's forward still computed its extra math, so the folded
module diverged from the calibrated one (10 % for ``2 * conv(x) + 1``, 190 % for ``linear(x) + 3``)
with the BN reported folded. Such a producer is now refused (``UNSUPPORTED_PRODUCER``)."""
from __future__ import annotations

import types

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import bnfold.torch  # noqa: E402
from bnfold.records import Action, Reason  # noqa: E402


class Net(nn.Module):
    def __init__(self, producer: nn.Module, bn: nn.Module) -> None:
        super().__init__()
        self.c = producer
        self.bn = bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.c(x))


def _conv_net() -> tuple[Net, list[torch.Tensor]]:
    torch.manual_seed(0)
    c = nn.Conv2d(3, 4, 3)
    c.forward = types.MethodType(lambda self, x: 2 * nn.Conv2d.forward(self, x) + 1, c)
    g = torch.Generator().manual_seed(1)
    return Net(c, nn.BatchNorm2d(4)).train(), [torch.randn(8, 3, 9, 9, generator=g) for _ in range(3)]


def _linear_net() -> tuple[Net, list[torch.Tensor]]:
    torch.manual_seed(0)
    lin = nn.Linear(5, 4)
    lin.forward = types.MethodType(lambda self, x: nn.Linear.forward(self, x) + 3, lin)
    g = torch.Generator().manual_seed(1)
    return Net(lin, nn.BatchNorm1d(4)).train(), [torch.randn(8, 5, generator=g) for _ in range(3)]


@pytest.mark.parametrize("make", [_conv_net, _linear_net], ids=["conv", "linear"])
def test_producer_with_an_instance_forward_is_not_folded(make: object) -> None:
    net, batches = make()  # type: ignore[operator]
    frozen, _ = bnfold.torch.calibrate(net, batches)
    res = bnfold.torch.fold(net, batches)
    [rec] = res.report.bns
    assert rec.action is not Action.FOLDED and rec.reason is Reason.UNSUPPORTED_PRODUCER
    assert "instance" in rec.detail
    with torch.no_grad():
        torch.testing.assert_close(res.module(batches[0]), frozen(batches[0]), rtol=1e-5, atol=1e-5)
