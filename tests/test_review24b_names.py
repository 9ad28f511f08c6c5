"""review24b: a module whose submodule name torch.fx cannot write as Python (set with ``setattr``:
a newline in it, a dot, a keyword such as ``for``) made ``bnfold.torch.fold`` end in fx's raw
``SyntaxError`` ("unterminated string literal") or ``AttributeError`` from its generated code. It is
an ``UnsupportedModelError`` now, one line naming the submodule and the way out; calibration
(no tracing) handles such names."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import bnfold.torch as bt  # noqa: E402
from bnfold.errors import UnsupportedModelError  # noqa: E402


def _model(bn_name: str) -> nn.Module:
    m = nn.Sequential()
    m.add_module("conv", nn.Conv2d(3, 4, 3))
    setattr(m, bn_name, nn.BatchNorm2d(4))  # add_module refuses a dot; setattr does not check
    return m.train()


DATA = [torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]


@pytest.mark.parametrize("bn_name", ["bn\nx", "bn.x", "for", "bn\rx", 'bn"x', "bn\\x", "bn\\n", "bn\x00x", "None"])
def test_fold_refuses_unwritable_name_in_one_line(bn_name: str) -> None:
    model = _model(bn_name)
    with pytest.raises(UnsupportedModelError) as info:
        bt.fold(model, DATA)
    msg = str(info.value)
    assert "\n" not in msg
    assert repr(bn_name) in msg and "rename" in msg


@pytest.mark.parametrize("bn_name", ["bn\nx", "bn.x", "for"])
def test_calibrate_handles_unwritable_name(bn_name: str) -> None:
    frozen, stats = bt.calibrate(_model(bn_name), DATA)
    assert list(stats) == [bn_name]


@pytest.mark.parametrize("bn_name", ["bn x", "1bn", "bn-x", "bn\u00b7x", "bn\tx", "bn'x", "bn\x0cx", "self"])
def test_fold_handles_names_fx_can_write(bn_name: str) -> None:
    res = bt.fold(_model(bn_name), DATA)
    assert [(b.name, b.action.value) for b in res.report.bns] == [(bn_name, "folded")]


class _ConvBn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        setattr(self, "unused\nhead", nn.Identity())  # noqa: B010

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def test_unwritable_name_off_the_traced_path_folds() -> None:
    """Only names the graph uses matter: an unused submodule may be called anything."""
    res = bt.fold(_ConvBn().train(), DATA)
    assert [(b.name, b.action.value) for b in res.report.bns] == [("bn", "folded")]
