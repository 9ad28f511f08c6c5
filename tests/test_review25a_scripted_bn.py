"""Review 25a: an eager model holding a TorchScript BN (``torch.jit.script(nn.BatchNorm2d(4))`` as a
submodule) made ``calibrate`` and ``fold`` fail with raw torch errors ("register_forward_pre_hook is
not supported on ScriptModules", fx's "contains(): incompatible function arguments"). Calibrating it
is now ``UnsupportedModelError`` naming the fix; folding a model whose scripted BN keeps its
statistics keeps it (``UNKNOWN_BN_FORWARD``) and folds nothing wrong."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import bnfold.torch  # noqa: E402
from bnfold.errors import UnsupportedModelError  # noqa: E402
from bnfold.records import Reason  # noqa: E402


def _net(train: bool) -> nn.Sequential:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), torch.jit.script(bn), nn.ReLU())
    return net.train(train)


def _x() -> torch.Tensor:
    return torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("entry", ["calibrate", "fold"])
def test_calibrating_a_scripted_bn_is_one_line(entry: str) -> None:
    net = _net(train=True)
    with pytest.raises(UnsupportedModelError) as info:
        getattr(bnfold.torch, entry)(net, [_x(), _x()])
    assert "TorchScript" in str(info.value) and "\n" not in str(info.value) and "'1'" in str(info.value)


@pytest.mark.parametrize("how", ["none", "example_inputs"])
def test_a_scripted_eval_bn_is_kept(how: str) -> None:
    net = _net(train=False)
    kw = {"example_inputs": (_x(),)} if how == "example_inputs" else {}
    res = bnfold.torch.fold(net, **kw)
    [rec] = res.report.bns
    assert rec.reason is Reason.UNKNOWN_BN_FORWARD
    with torch.no_grad():
        torch.testing.assert_close(res.module(_x()), net(_x()))
