"""Review 25a: a hand-written BN that normalises with ``torch.batch_norm`` (the op ``F.batch_norm``
calls, with its own argument order: weight and bias before the running statistics) on its own
buffers was not seen: a plain module was left with its stale statistics (a warning saying it does not
call F.batch_norm), a ``BatchNorm2d`` subclass was refused. Both are now calibrated like a module
calling ``F.batch_norm`` (Algorithm 2, checked against update_bn in float64) and kept
(``UNKNOWN_BN_FORWARD``)."""
from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.optim.swa_utils import update_bn  # noqa: E402

import bnfold.torch  # noqa: E402
from bnfold.records import Reason  # noqa: E402


class TorchBN(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(c) + 0.5)
        self.bias = nn.Parameter(torch.randn(c))
        self.eps = 1e-5
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var, self.training, 0.1,
                                self.eps, False)


class TorchBNSub(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var, self.training, 0.1,
                                self.eps, False)


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 3, 8, 8, generator=g) for _ in range(3)]


@pytest.mark.parametrize("cls", [TorchBN, TorchBNSub])
def test_torch_batch_norm_is_calibrated(cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), cls(4)).train()
    frozen, stats = bnfold.torch.calibrate(net, _batches())
    assert list(stats) == ["1"]
    # the oracle: the same network as a torch BatchNorm2d, update_bn in float64 (equal batches)
    ref = nn.Sequential(copy.deepcopy(net[0]), nn.BatchNorm2d(4, momentum=None)).double()
    update_bn([b.double() for b in _batches()], ref)
    torch.testing.assert_close(frozen[1].running_mean.double(), ref[1].running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(frozen[1].running_var.double(), ref[1].running_var, rtol=1e-6, atol=1e-6)
    res = bnfold.torch.fold(net, _batches())
    [rec] = res.report.bns
    assert rec.reason is Reason.UNKNOWN_BN_FORWARD and rec.stats is not None
