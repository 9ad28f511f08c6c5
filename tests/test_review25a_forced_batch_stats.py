"""Review 25a: a hand-written BN whose ``F.batch_norm`` call passes ``training=True`` whatever the
module's mode normalises with batch statistics in eval mode too, so the calibrated statistics it is
given are never used: ``calibrate`` wrote them and ``fold`` kept the module, with no word that the
frozen module still depends on the batch. It is an error naming the fix."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import bnfold.torch  # noqa: E402
from bnfold.errors import BnfoldError, UnsupportedModelError  # noqa: E402


class HandBN(nn.Module):
    """A BN written by hand on its own buffers; ``always_batch`` passes ``training=True``."""

    def __init__(self, c: int, always_batch: bool) -> None:
        super().__init__()
        self.always_batch = always_batch
        self.weight = nn.Parameter(torch.rand(c) + 0.5)
        self.bias = nn.Parameter(torch.randn(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        training = True if self.always_batch else self.training
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training, 0.1, 1e-5)


def _net(always_batch: bool) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), HandBN(4, always_batch), nn.ReLU())


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 3, 8, 8, generator=g) for _ in range(4)]


@pytest.mark.parametrize("entry", ["calibrate", "fold"])
def test_forced_batch_statistics_are_an_error(entry: str) -> None:
    net = _net(always_batch=True)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    call = bnfold.torch.calibrate if entry == "calibrate" else bnfold.torch.fold
    with pytest.raises(UnsupportedModelError) as info:
        call(net, _batches())
    msg = str(info.value)
    assert "\n" not in msg and "'1'" in msg and "training=True" in msg and "self.training" in msg
    assert isinstance(info.value, BnfoldError)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


def test_training_self_training_still_calibrates() -> None:
    net = _net(always_batch=False)
    frozen, stats = bnfold.torch.calibrate(net, _batches())
    assert list(stats) == ["1"]
    x = _batches()[0]
    bn = frozen[1]
    with torch.no_grad():
        want = torch.relu(F.batch_norm(frozen[0](x), bn.running_mean, bn.running_var, bn.weight, bn.bias, False,
                                       0.0, 1e-5))
        assert torch.equal(frozen(x), want)
