"""review24d: models held in torch.compile / DataParallel / AveragedModel wrappers fold (the module inside)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import bnfold.torch as bt  # noqa: E402


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4))


def _wrappers():
    from torch.optim.swa_utils import AveragedModel
    return {"dataparallel": nn.DataParallel, "averaged": AveragedModel}


X = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
BATCHES = [X[i:i + 4] for i in range(0, 16, 4)]


def _snapshot(m: nn.Module):
    return ({k: v.clone() for k, v in m.state_dict().items()}, {n: s.training for n, s in m.named_modules()})


def _check(wrapped: nn.Module, inner: nn.Module) -> None:
    before = _snapshot(inner)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = bt.fold(wrapped, BATCHES)
        frozen, _ = bt.calibrate(inner, BATCHES)
    assert res.report.folded == 2
    assert [b.name for b in res.report.bns] == ["1", "4"]
    assert any("wraps the model" in w for w in res.report.warnings)
    with torch.no_grad():
        got, want = res.module(X), frozen(X)
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
    after = _snapshot(inner)
    assert before[1] == after[1]
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])


@pytest.mark.parametrize("kind", ["dataparallel", "averaged"])
def test_fold_through_pass_through_wrapper(kind: str) -> None:
    inner = _model()
    wrapped = _wrappers()[kind](inner)
    _check(wrapped, inner if kind == "dataparallel" else wrapped.module)


@pytest.mark.slow
def test_fold_torch_compiled_module() -> None:
    inner = _model()
    _check(torch.compile(inner), inner)


@pytest.mark.slow
@pytest.mark.parametrize("suffix", ["onnx", "pt2"])
def test_convert_torch_compiled_module(tmp_path, suffix: str) -> None:
    data = tmp_path / "x.npy"
    np.save(data, X.numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        done = bt.convert(torch.compile(_model()), data, tmp_path / f"out.{suffix}", batch_size=4)
    assert done.passed
    assert done.report.folded == 2
    assert any("OptimizedModule wraps the model" in w for w in done.warnings)


def test_wrapper_with_its_own_hook_is_not_unwrapped() -> None:
    from bnfold.torch.wrappers import unwrap
    dp = nn.DataParallel(_model())
    dp.register_forward_hook(lambda mod, i, o: o * 2)
    assert unwrap(dp) == (dp, [])


class _Net(nn.Module):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Conv2d(4, 2, 1)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x):
        return self.bn(self.head(self.backbone(x)))


def _fold_net(net: nn.Module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = bt.fold(net, BATCHES)
        frozen, _ = bt.calibrate(net, BATCHES)
    with torch.no_grad():
        got, want = res.module(X), frozen(X)
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
    return res


def test_dataparallel_child_bns_are_folded_and_reported() -> None:
    res = _fold_net(_Net(nn.DataParallel(_model())))
    assert [(b.name, b.action.value) for b in res.report.bns] == [
        ("backbone.module.1", "folded"), ("backbone.module.4", "folded"), ("bn", "folded")]
    assert not any("training-time forward" in w for w in res.report.warnings)


@pytest.mark.slow
def test_compiled_child_is_traced_through() -> None:
    res = _fold_net(_Net(torch.compile(_model())))
    assert res.report.folded == 3


def test_bn_inside_a_leaf_module_is_reported_kept() -> None:
    from bnfold.records import Reason
    dp = nn.DataParallel(_model())
    dp.register_forward_hook(lambda mod, i, o: None)  # a wrapper with its own hook stays a leaf
    res = _fold_net(_Net(dp))
    assert [(b.name, b.reason) for b in res.report.bns] == [
        ("backbone.module.1", Reason.IN_SUBGRAPH), ("backbone.module.4", Reason.IN_SUBGRAPH), ("bn", None)]
    assert not any("backbone.module" in w for w in res.report.warnings
                   if "training-time" in w or "not used by forward" in w)


@pytest.mark.slow
def test_convert_onnx_with_compiled_child(tmp_path) -> None:
    data = tmp_path / "x.npy"
    np.save(data, X.numpy())
    net = _Net(torch.compile(_model()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        done = bt.convert(net, data, tmp_path / "out.onnx", batch_size=4)
    assert done.passed
    assert done.report.folded == 3
    assert type(net.backbone).__name__ == "OptimizedModule"  # put back after the export
