"""Issue 16 point 1: every BN computation is calibrated and folded, wherever it sits.

A BN subclass that overrides ``forward`` (timm's ``BatchNormAct2d``: BN, then drop, then an
activation, all in one module), a module that calls ``F.batch_norm`` on its own buffers, a
SyncBatchNorm run on one process, a lazy BN, mmcv's ``_BatchNormXd``: each is calibrated with
Algorithm 2 (oracle: ``torch.optim.swa_utils.update_bn`` on a float64 copy with equal-size
batches, no dropout in these nets) and folded where bnfold knows what it computes (oracle: the
eval-mode module itself). A BN-like module bnfold cannot calibrate is an error, never stale.
"""
from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.modules.batchnorm import _BatchNorm  # noqa: E402
from torch.optim.swa_utils import update_bn  # noqa: E402

import bnfold.torch as bt  # noqa: E402
from bnfold.errors import BadInputError, UnsupportedModelError  # noqa: E402
from bnfold.records import Action, Reason  # noqa: E402

# Algorithm 2 on float64 activations against update_bn on a float64 copy: both sum the same
# per-batch moments in float64, so they agree to a few ulps of float64 (1e-15 measured in the
# issue); 1e-9 leaves room for the different summation order of a 16x16 activation.
STAT_RTOL = 1e-9
# the folded float32 module against the eval-mode float32 module: one float32 rounding of the
# folded weights (2^-24 relative) times the ~27-75 products of a 3x3 conv, on outputs of scale ~1
FOLD_ATOL = 1e-4


class BatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.BatchNormAct2d's forward (timm 1.0.31, layers/norm_act.py), copied: BN through
    ``F.batch_norm`` on the module's buffers, then ``drop`` and ``act``."""

    def __init__(self, num_features: int, act: nn.Module | None = None) -> None:
        super().__init__(num_features)
        self.drop = nn.Identity()
        self.act = act if act is not None else nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        bn_training = True if self.training else (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight, self.bias, bn_training, factor, self.eps,
        )
        return self.act(self.drop(x))


class FunctionalBN(nn.Module):
    """Not a ``_BatchNorm``: holds BN buffers and calls ``F.batch_norm`` on them (a hand-written BN)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, 1e-5)


class _BatchNormXd(_BatchNorm):
    """mmcv's ``_BatchNormXd`` (revert_sync_batchnorm): any rank, the standard forward."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        return


class Manual(nn.BatchNorm2d):
    """A BN subclass whose forward normalises by hand: bnfold cannot see its computation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = self.running_mean.view(1, -1, 1, 1)  # type: ignore[union-attr]
        var = self.running_var.view(1, -1, 1, 1)  # type: ignore[union-attr]
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def _randomise(net: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (_BatchNorm, FunctionalBN)):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
    return net.eval()


def _batches(n: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 16, 16, generator=g) * 3 + 1 for _ in range(n)]


def _bn_modules(net: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, m in net.named_modules():
        if isinstance(m, (_BatchNorm, FunctionalBN)):
            yield name, m


def _oracle(net: nn.Module, batches: list[torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """update_bn on a float64 copy (equal-size batches, no dropout: Algorithm 2's estimate)."""
    ref = copy.deepcopy(net).double()
    update_bn([b.double() for b in batches], ref)
    return {name: (m.running_mean.clone(), m.running_var.clone()) for name, m in _bn_modules(ref)
            if m.running_mean is not None}


def _assert_calibrated(frozen: nn.Module, want: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    got = dict(_bn_modules(frozen))
    for name, (mean, var) in want.items():
        m = got[name]
        torch.testing.assert_close(m.running_mean, mean, rtol=STAT_RTOL, atol=1e-12, msg=f"mean of {name}")
        torch.testing.assert_close(m.running_var, var, rtol=STAT_RTOL, atol=1e-12, msg=f"var of {name}")


def _issue_net() -> nn.Sequential:
    """The issue's minimal case, with the local copy of timm's BatchNormAct2d."""
    torch.manual_seed(0)
    return _randomise(nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)))


def test_issue_minimal_case_is_calibrated_like_update_bn() -> None:
    net = _issue_net().double()
    batches = [b.double() for b in _batches()]
    want = _oracle(net, batches)
    frozen, stats = bt.calibrate(net, batches)
    assert set(stats) == {"1", "3"}  # the BatchNormAct2d is in the return value
    _assert_calibrated(frozen, want)
    assert float(want["1"][1].min()) > 2.0  # the stale 1.0 the issue saw is far from the oracle


@pytest.mark.parametrize("kind", ["functional", "sync", "lazy", "mmcv", "act"])
def test_every_bn_computation_is_calibrated(kind: str) -> None:
    torch.manual_seed(0)
    bn: nn.Module = {
        "functional": lambda: FunctionalBN(8), "sync": lambda: nn.SyncBatchNorm(8),
        "lazy": lambda: nn.LazyBatchNorm2d(), "mmcv": lambda: _BatchNormXd(8),
        "act": lambda: BatchNormAct2d(8, nn.SiLU()),
    }[kind]()
    net = nn.Sequential(nn.Conv2d(3, 8, 3), bn, nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))
    if kind == "lazy":
        net(torch.zeros(2, 3, 8, 8))  # materialise
    net = _randomise(net).double()
    batches = [b.double() for b in _batches()]
    want: dict[str, tuple[torch.Tensor, torch.Tensor]]
    if kind == "functional":  # update_bn knows only _BatchNorm: Algorithm 2 by hand for the functional BN
        with torch.no_grad():
            acts = [net[0](b) for b in batches]
        m = acts[0].numel() // 8
        mu = torch.stack([a.mean((0, 2, 3)) for a in acts])
        var = torch.stack([a.var((0, 2, 3), unbiased=False) for a in acts])
        want = {"1": (mu.mean(0), var.mean(0) * m / (m - 1))}
        ref = copy.deepcopy(net)
        ref[1].running_mean.copy_(want["1"][0])
        ref[1].running_var.copy_(want["1"][1])
        want["3"] = _oracle(ref, batches)["3"]
    else:
        want = _oracle(net, batches)
    frozen, stats = bt.calibrate(net, batches)
    assert set(stats) == {"1", "3"}
    _assert_calibrated(frozen, want)


def test_a_bn_subclass_bnfold_cannot_see_is_an_error_not_stale() -> None:
    net = _randomise(nn.Sequential(nn.Conv2d(3, 8, 3), Manual(8)))
    with pytest.raises(UnsupportedModelError, match=r"BN '1' \(Manual\).*F\.batch_norm"):
        bt.calibrate(net, _batches())


def test_batchnormact_folds_its_bn_and_keeps_its_activation() -> None:
    net = _issue_net()
    batches = _batches()
    result = bt.fold(net, batches, recalibrate="all")
    by_name = {r.name: r for r in result.report.bns}
    assert set(by_name) == {"1", "3"}
    assert by_name["1"].action is Action.FOLDED and by_name["3"].action is Action.FOLDED
    frozen, _ = bt.calibrate(net, batches)
    x = _batches(2, seed=7)[1]
    with torch.no_grad():
        want, got = frozen(x), result.module(x)
    assert float((want - got).abs().max()) < FOLD_ATOL
    # the BN part is gone, the ReLU stays (without it the outputs above would differ: the folded
    # conv's output has negative values that the ReLU clips)
    assert not any(isinstance(m, _BatchNorm) for m in result.module.modules())
    assert any(isinstance(m, nn.ReLU) for m in result.module.modules())
    with torch.no_grad():
        assert float(result.module.get_submodule("0")(x).min()) < 0


def test_a_subclass_bnfold_cannot_fold_is_kept_with_a_reason() -> None:
    net = _randomise(nn.Sequential(nn.Conv2d(3, 8, 3), Manual(8)))
    result = bt.fold(net, example_inputs=_batches(1)[0])
    (rec,) = result.report.bns
    assert rec.action is Action.FROZEN_KEPT and rec.reason is Reason.UNKNOWN_BN_FORWARD


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.misc.FrozenBatchNorm2d's forward (an affine from buffers)."""

    def __init__(self, n: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        return x * scale + (b - rm * scale)


def test_frozen_batchnorm_folds() -> None:
    torch.manual_seed(0)
    fbn = FrozenBatchNorm2d(8)
    with torch.no_grad():
        fbn.weight.uniform_(0.5, 1.5)
        fbn.bias.normal_()
        fbn.running_mean.normal_()
        fbn.running_var.uniform_(0.5, 2)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), fbn, nn.ReLU()).eval()
    x = _batches(1)[0]
    result = bt.fold(net, example_inputs=x)
    (rec,) = result.report.bns
    assert rec.name == "1" and rec.action is Action.FOLDED
    with torch.no_grad():
        assert float((net(x) - result.module(x)).abs().max()) < FOLD_ATOL
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in result.module.modules())


@pytest.fixture(scope="module")
def timm(torchvision_ops: None) -> Any:
    """timm (it imports torchvision, which needs the ``torchvision_ops`` fixture of conftest.py to
    import here), or skip."""
    return pytest.importorskip("timm")


def test_real_timm_batchnormact2d(timm: Any) -> None:
    from timm.layers import BatchNormAct2d as TimmBNAct

    torch.manual_seed(0)
    net = _randomise(nn.Sequential(nn.Conv2d(3, 8, 3), TimmBNAct(8), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)))
    batches = _batches()
    want = _oracle(net, batches)
    frozen, stats = bt.calibrate(net.double(), [b.double() for b in batches])
    assert set(stats) == {"1", "3"}
    _assert_calibrated(frozen, want)
    result = bt.fold(net.float(), batches, recalibrate="all")
    assert [(r.name, r.action) for r in result.report.bns] == [("1", Action.FOLDED), ("3", Action.FOLDED)]
    ref, _ = bt.calibrate(net.float(), batches)
    x = _batches(1, seed=5)[0]
    with torch.no_grad():
        assert float((ref(x) - result.module(x)).abs().max()) < FOLD_ATOL


class Scaled(nn.BatchNorm2d):
    """A subclass bnfold does not know: ``F.batch_norm`` on its buffers, then something of its own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return 2 * F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                                factor, self.eps)


def test_an_unknown_subclass_is_calibrated_and_kept_with_a_reason() -> None:
    torch.manual_seed(0)
    net = _randomise(nn.Sequential(nn.Conv2d(3, 8, 3), Scaled(8), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)))
    batches = _batches()
    want = _oracle(net.double(), [b.double() for b in batches])
    frozen, stats = bt.calibrate(net, [b.double() for b in batches])
    _assert_calibrated(frozen, want)
    net = net.float()
    result = bt.fold(net, batches, recalibrate="all")
    by_name = {r.name: r for r in result.report.bns}
    assert by_name["1"].action is Action.FROZEN_KEPT and by_name["1"].reason is Reason.UNKNOWN_BN_FORWARD
    assert by_name["1"].stats is not None and by_name["1"].drift is not None
    assert by_name["3"].action is Action.FOLDED
    ref, _ = bt.calibrate(net, batches)
    x = _batches(1, seed=3)[0]
    with torch.no_grad():
        assert float((ref(x) - result.module(x)).abs().max()) < FOLD_ATOL


def test_batchnormact_in_train_mode_and_without_running_stats() -> None:
    """fold's default recalibrate='training' picks a BatchNormAct2d in train mode; one with
    track_running_stats=False is found by its weight and gains running statistics."""
    torch.manual_seed(0)
    bn2 = BatchNormAct2d(8)
    bn2.track_running_stats = False
    bn2.running_mean = bn2.running_var = bn2.num_batches_tracked = None
    net = _randomise(nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8), nn.Conv2d(8, 8, 3), bn2))
    net[1].train()
    batches = _batches()
    want = {"1": _oracle(net.double(), [b.double() for b in batches])["1"]}
    frozen, stats = bt.calibrate(net, [b.double() for b in batches])
    assert set(stats) == {"1", "3"} and frozen[3].running_var is not None
    _assert_calibrated(frozen, want)
    net = net.float()
    result = bt.fold(net, batches)
    assert [(r.name, r.action, r.stats is not None) for r in result.report.bns] == [
        ("1", Action.FOLDED, True), ("3", Action.FOLDED, True)]


def test_a_reused_batchnormact_is_refused_unless_allowed() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = BatchNormAct2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.bn(self.conv(x)) + 1)

    with pytest.raises(BadInputError, match="applied more than once"):
        bt.calibrate(Twice().eval(), _batches())
    _, stats = bt.calibrate(Twice().eval(), _batches(), allow_reused_bn=True)
    assert set(stats) == {"bn"}


def test_real_torchvision_frozen_batchnorm_folds(timm: Any) -> None:
    from torchvision.ops.misc import FrozenBatchNorm2d as TvFrozen  # loadable once the timm fixture ran

    torch.manual_seed(0)
    fbn = TvFrozen(8)
    with torch.no_grad():
        fbn.weight.uniform_(0.5, 1.5)
        fbn.bias.normal_()
        fbn.running_mean.normal_()
        fbn.running_var.uniform_(0.5, 2)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), fbn, nn.ReLU(), nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4)).eval()
    batches = _batches()
    result = bt.fold(net, batches, recalibrate="all")
    assert [(r.name, r.action) for r in result.report.bns] == [("1", Action.FOLDED), ("4", Action.FOLDED)]
    assert result.report.bns[0].stats is None  # frozen by design: its statistics are kept
    ref, stats = bt.calibrate(net, batches)
    assert set(stats) == {"4"} and torch.equal(ref[1].running_var, fbn.running_var)
    with torch.no_grad():
        assert float((ref(batches[0]) - result.module(batches[0])).abs().max()) < FOLD_ATOL


def test_real_timm_model_every_bn_calibrated_and_folded(timm: Any) -> None:
    """mobilenetv3_small_100: every BN is a BatchNormAct2d; all calibrated like update_bn, all folded."""
    torch.manual_seed(0)
    net = _randomise(timm.create_model("mobilenetv3_small_100", pretrained=False, drop_rate=0.0))
    batches = _batches(3)
    bns = [n for n, m in net.named_modules() if isinstance(m, _BatchNorm)]
    want = _oracle(net, batches)
    frozen, stats = bt.calibrate(net.double(), [b.double() for b in batches])
    assert set(stats) == set(bns)
    _assert_calibrated(frozen, want)
    net = net.float()
    result = bt.fold(net, batches, recalibrate="all")
    assert {r.name for r in result.report.bns if r.action is Action.FOLDED} == set(bns)
    ref, _ = bt.calibrate(net, batches)
    x = _batches(1, seed=9)[0]
    with torch.no_grad():
        want_y = ref(x)
        # float32 through ~50 folded layers: relative to the output's scale
        assert float((want_y - result.module(x)).abs().max()) < 1e-4 * float(want_y.abs().max())
