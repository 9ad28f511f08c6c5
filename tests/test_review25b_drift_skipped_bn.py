"""Review 25b: bnfold.torch.drift dropped calibrate's warnings, so a BN the eval-mode pass never
calls (an auxiliary head behind ``if self.training``) was missing from its result silently; it now
names it, and ``training_graph=True`` gives that BN a record as calibrate does."""
from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import bnfold.torch as bt  # noqa: E402
from bnfold.errors import BnfoldWarning  # noqa: E402


class _AuxHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.aux_conv = nn.Conv2d(4, 4, 1)
        self.aux = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        y = self.bn(self.conv(x))
        if self.training:
            return y, self.aux(self.aux_conv(y))
        return y


def _data() -> list:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 3, 8, 8, generator=g) for _ in range(3)]


def test_drift_names_a_bn_it_has_no_record_for() -> None:
    model = _AuxHead().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = bt.drift(model, _data())
    assert sorted(result) == ["bn"]
    named = [str(w.message) for w in caught if issubclass(w.category, BnfoldWarning) and "'aux'" in str(w.message)]
    assert named and "training_graph=True" in named[0]


def test_drift_training_graph_reaches_the_aux_head() -> None:
    model = _AuxHead().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = bt.drift(model, _data(), training_graph=True)
        frozen, _ = bt.calibrate(model, _data(), training_graph=True)
    assert sorted(result) == ["aux", "bn"]
    assert not model.training  # untouched
    aux = result["aux"]
    assert aux.mean_shift_sigma_max is not None and aux.mean_shift_sigma_max > 0.01
    mu = frozen.aux.running_mean.double()
    sigma = (frozen.aux.running_var.double() + model.aux.eps).sqrt()
    expected = ((model.aux.running_mean.double() - mu).abs() / sigma).max().item()
    assert aux.mean_shift_sigma_max == pytest.approx(expected, rel=1e-5)
