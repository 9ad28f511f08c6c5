"""BNs that run only in training mode (issue 16 point 3): ``training_graph=True`` /
``--training-graph`` calibrates them on the module's training-time forward with Dropout, DropPath
and StochasticDepth off; by default they keep their stored statistics with a warning naming the
option.

Oracle: Algorithm 2 of the BN paper in float64 numpy on the same activations: a float64 copy of the
module is run with every module in train mode except the stochastic layers (set to eval here, by
hand, and the functional dropout of the test module switched off through its own flag); each BN's
inputs are captured by forward pre-hooks; E[x] = mean of the batch means, Var[x] = m/(m-1) x mean
of the biased batch variances. bnfold runs on a float64 module too, so the two agree to rounding
(1e-10 relative: sums of a few thousand float64 values).
"""
from __future__ import annotations

import contextlib
import copy
import io
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import bnfold.torch as bt  # noqa: E402
from bnfold.errors import BadInputError  # noqa: E402


class DropPath(nn.Module):
    """timm's DropPath (same class name, same computation): drops whole samples in training."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class AuxNet(nn.Module):
    """A main path (Conv -> BN -> DropPath -> Conv -> BN after Dropout2d) and an auxiliary head,
    as GoogLeNet's, that runs only in training mode: functional dropout -> Conv -> BN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.drop_path = DropPath(0.5)
        self.drop = nn.Dropout2d(0.5)
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(5)
        self.aux_conv = nn.Conv2d(6, 4, 1)
        self.aux_bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(5, 3)
        self.functional_dropout = True  # the oracle switches it off

    def forward(self, x: torch.Tensor) -> Any:
        h = torch.relu(self.bn(self.conv(x)))
        h = h + self.drop_path(h)
        out = self.fc(self.bn2(self.conv2(self.drop(h))).mean((2, 3)))
        if self.training:
            a = F.dropout(h, 0.5, training=self.functional_dropout)
            return out, self.aux_bn(self.aux_conv(a))
        return out


BNS = ("bn", "bn2", "aux_bn")


def make() -> AuxNet:
    torch.manual_seed(0)
    net = AuxNet()
    with torch.no_grad():
        for name in BNS:
            bn = net.get_submodule(name)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
            bn.running_mean.fill_(7.0)  # stored statistics that no oracle gives
            bn.running_var.fill_(9.0)
    return net.train()


def batches(dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(4, 3, 8, 8, generator=g) * 2 + 1).to(dtype) for _ in range(3)]


def algorithm2(net: nn.Module, data: list[torch.Tensor], names: tuple[str, ...],
               stochastic: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Algorithm 2 in float64 numpy on the BN inputs of ``net``'s training-time forward (a float64
    copy; ``stochastic``: Dropout/DropPath left on, as update_bn runs them)."""
    work = copy.deepcopy(net).double().train()
    if not stochastic:
        for m in work.modules():
            if isinstance(m, (nn.Dropout2d, DropPath)):
                m.eval()
        work.functional_dropout = False
    seen: dict[str, list[np.ndarray]] = {n: [] for n in names}
    hooks = [work.get_submodule(n).register_forward_pre_hook(
        lambda _m, a, _n=n: seen[_n].append(a[0].detach().numpy().copy())) for n in names]
    with torch.no_grad():
        for x in data:
            work(x.double())
    for h in hooks:
        h.remove()
    result = {}
    for n, xs in seen.items():
        m = xs[0].size // xs[0].shape[1]
        mean = np.mean([x.mean(axis=(0, 2, 3)) for x in xs], axis=0)
        var = np.mean([x.var(axis=(0, 2, 3)) for x in xs], axis=0) * m / (m - 1)
        result[n] = (mean, var)
    return result


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) / np.abs(b)))


def test_default_keeps_the_aux_bn_and_names_the_option() -> None:
    net = make().double()
    frozen, stats = bt.calibrate(net, batches())
    assert set(stats) == {"bn", "bn2"}
    aux = frozen.get_submodule("aux_bn")
    assert torch.all(aux.running_mean == 7.0) and torch.all(aux.running_var == 9.0)


def test_default_warning_names_training_graph() -> None:
    res = bt.fold(make().double(), batches())
    assert any("BN 'aux_bn' was never called during calibration" in w and "pass training_graph=True" in w
               for w in res.report.warnings), res.report.warnings


def test_training_graph_calibrates_the_aux_bn_with_dropout_off() -> None:
    net = make().double()
    data = batches()
    frozen, stats = bt.calibrate(net, data, training_graph=True)
    assert set(stats) == set(BNS)
    oracle = algorithm2(net, data, BNS)
    noisy = algorithm2(net, data, BNS, stochastic=True)
    for name in BNS:
        mean, var = oracle[name]
        bn = frozen.get_submodule(name)
        assert rel(stats[name].mean, mean) < 1e-10 and rel(stats[name].var_unbiased, var) < 1e-10, name
        assert rel(bn.running_mean.numpy(), mean) < 1e-10 and rel(bn.running_var.numpy(), var) < 1e-10, name
    # Dropout2d, DropPath and F.dropout act on bn2 and aux_bn: with them on, the statistics move by
    # far more than the tolerance above (so the test sees whether bnfold switched them off)
    assert rel(noisy["bn2"][1], oracle["bn2"][1]) > 1e-2 and rel(noisy["aux_bn"][1], oracle["aux_bn"][1]) > 1e-2
    assert not frozen.training and not any(m.training for m in frozen.modules())
    assert net.training and all(m.training for m in net.modules())  # the input module is untouched


def test_eval_mode_bns_keep_their_statistics_in_the_training_graph() -> None:
    """recalibrate='training': an eval-mode BN is not recalibrated and its buffers are not updated,
    although the training-time forward puts the rest of the module in train mode."""
    net = make().double()
    net.bn.eval()
    res = bt.fold(net, batches(), training_graph=True, inplace=True)
    assert {b.name for b in res.report.bns if b.stats is not None} == {"bn2"}
    assert res.report.extra["training_only_bns"] == ["aux_bn"]
    assert torch.all(net.bn.running_mean == 7.0) and torch.all(net.bn.running_var == 9.0)
    assert int(net.bn.num_batches_tracked) == 0
    assert not torch.all(net.bn2.running_mean == 7.0)  # calibrated in place


def test_fold_with_training_graph() -> None:
    net = make()
    data = batches(torch.float32)
    res = bt.fold(net, data, training_graph=True)
    assert res.report.extra["training_only_bns"] == ["aux_bn"]
    assert any("BN 'aux_bn' runs only in the training-time forward: calibrated (training_graph=True)" in w
               for w in res.report.warnings)
    assert not any("aux_bn' is not used by forward" in w for w in res.report.warnings)
    assert {b.name: b.action.value for b in res.report.bns} == {"bn": "folded", "bn2": "folded"}
    # the folded module computes the eval-mode function with the Algorithm 2 statistics
    oracle = algorithm2(net, data, BNS)
    ref = copy.deepcopy(net)
    with torch.no_grad():
        for name in ("bn", "bn2"):
            ref.get_submodule(name).running_mean.copy_(torch.from_numpy(oracle[name][0]))
            ref.get_submodule(name).running_var.copy_(torch.from_numpy(oracle[name][1]))
        ref.eval()
        # float32 convs with folded weights vs float32 BN: a few ulps of outputs of scale ~1
        torch.testing.assert_close(res.module(data[0]), ref(data[0]), rtol=1e-5, atol=1e-5)


def test_training_graph_needs_data() -> None:
    with pytest.raises(BadInputError, match=r"training_graph=True calibrates on the training-time forward; "
                                            r"pass calibration data"):
        bt.fold(make().eval(), None, training_graph=True)


def test_other_random_draws_are_named() -> None:
    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 1)
            self.bn = nn.BatchNorm2d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.training:
                x = x + 0.1 * torch.randn_like(x)  # noise injection: not a layer bnfold knows
            return self.bn(self.conv(x))

    res = bt.fold(Noisy().train(), batches(torch.float32), training_graph=True)
    assert any("draws random numbers outside the stochastic layers bnfold switches off (randn_like)" in w
               for w in res.report.warnings), res.report.warnings
    quiet = bt.fold(make(), batches(torch.float32), training_graph=True)  # DropPath's bernoulli_ is off
    assert not any("draws random numbers" in w for w in quiet.report.warnings)


# ----------------------------------------------------------------------------- the CLI


_MODELS = '''
import sys
sys.path.insert(0, {tests!r})
from test_torch_training_graph import make

def build():
    return make()
'''


def _cli(root: Path, *args: object) -> tuple[int, str]:
    """``bnfold ARGS`` in this process from ``root``: the exit code and what it printed."""
    from bnfold.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(root)
    sys.path.insert(0, str(root))
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main([str(a) for a in args])
    finally:
        sys.path.remove(str(root))
        os.chdir(cwd)
    return rc, out.getvalue() + err.getvalue()


@pytest.fixture()
def cli_root(tmp_path: Path) -> Path:
    (tmp_path / "auxmodels.py").write_text(_MODELS.format(tests=str(Path(__file__).parent)))
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).normal(size=(12, 3, 8, 8)).astype(np.float32))
    return tmp_path


def test_cli_training_graph_flag(cli_root: Path) -> None:
    rc, err = _cli(cli_root, "fold", "--model-factory", "auxmodels:build", "--data", "calib.npy", "--batch-size",
                   "4", "-o", "out.pt2", "--training-graph")
    assert rc == 0, err
    assert "BN 'aux_bn' runs only in the training-time forward: calibrated (--training-graph)" in err
    rc, err = _cli(cli_root, "fold", "--model-factory", "auxmodels:build", "--data", "calib.npy", "--batch-size",
                   "4", "-o", "out2.pt2")
    assert rc == 0, err
    assert "was never called during calibration" in err and "pass --training-graph to calibrate it" in err


# ----------------------------------------------------------------------------- torchvision GoogLeNet


@pytest.fixture()
def torchvision_models(torchvision_ops: None) -> Any:
    """torchvision's models, or skip (the ``torchvision_ops`` fixture of conftest.py says why it
    needs help to import here)."""
    try:
        import torchvision.models as models
    except Exception as exc:  # noqa: BLE001 - not installed, or another import failure: skip
        pytest.skip(f"torchvision does not import here ({type(exc).__name__}: {exc})")
    return models


@pytest.mark.slow
def test_googlenet_aux_heads(torchvision_models: Any) -> None:
    torch.manual_seed(0)
    net = torchvision_models.googlenet(weights=None, aux_logits=True, init_weights=True).double().train()
    names = tuple(n for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d))
    aux = tuple(n for n in names if n.startswith("aux"))
    assert len(aux) == 2
    g = torch.Generator().manual_seed(2)
    data = [torch.randn(4, 3, 64, 64, generator=g, dtype=torch.float64) for _ in range(2)]
    _, before = bt.calibrate(net, data)
    assert not set(aux) & set(before)
    _, stats = bt.calibrate(net, data, training_graph=True)
    assert set(stats) == set(names)
    work = copy.deepcopy(net)
    for m in work.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    seen: dict[str, list[np.ndarray]] = {n: [] for n in names}
    hooks = [work.get_submodule(n).register_forward_pre_hook(
        lambda _m, a, _n=n: seen[_n].append(a[0].detach().numpy().copy())) for n in names]
    with torch.no_grad():
        for x in data:
            work(x)
    for h in hooks:
        h.remove()
    for n, xs in seen.items():
        m = xs[0].size // xs[0].shape[1]
        mean = np.mean([x.mean(axis=(0, 2, 3)) for x in xs], axis=0)
        var = np.mean([x.var(axis=(0, 2, 3)) for x in xs], axis=0) * m / (m - 1)
        # float64 on both sides; means near 0 are compared on the variance's scale
        assert np.max(np.abs(stats[n].mean - mean) / np.sqrt(var)) < 1e-9, n
        assert rel(stats[n].var_unbiased, var) < 1e-9, n
