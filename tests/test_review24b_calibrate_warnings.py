"""review24b: ``bnfold.torch.calibrate`` collected its warnings and dropped them. A BN that runs only
in training mode (an auxiliary head behind ``if self.training``, torchvision's Inception v3
``AuxLogits``) was left with its stored statistics and missing from ``stats`` with no word at all
(``fold`` puts the same warning in its report); the sufficiency warning and the reused-BN warning
its docstring promises never reached the caller. They are Python warnings
(:class:`bnfold.errors.BnfoldWarning`) now."""
from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import bnfold.torch as bt  # noqa: E402
from bnfold.errors import BnfoldWarning  # noqa: E402


class AuxNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.aux = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        y = self.bn(self.conv(x))
        if self.training:
            return y, self.aux(y)
        return y


DATA = [torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]


def _messages(**kw: object) -> tuple[dict[str, object], list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, stats = bt.calibrate(AuxNet().train(), DATA, **kw)  # type: ignore[arg-type]
    return stats, [str(w.message) for w in caught if issubclass(w.category, BnfoldWarning)]


def test_training_only_bn_is_not_skipped_silently() -> None:
    stats, msgs = _messages()
    assert list(stats) == ["bn"]
    assert any("'aux.1' was never called" in m and "training_graph=True" in m for m in msgs), msgs


def test_sufficiency_warning_reaches_the_caller() -> None:
    _, msgs = _messages(training_graph=True)
    assert any("standard-error target" in m for m in msgs), msgs
    assert not any("never called" in m for m in msgs)


def test_no_warning_when_every_bn_is_calibrated_precisely() -> None:
    _, msgs = _messages(training_graph=True, target_se=100.0)
    assert msgs == []
