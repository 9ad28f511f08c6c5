"""Issue 15 points 2 and 3 on the PyTorch front end: ``recalibrate=`` in ``bnfold.torch.fold`` and
``bnfold.torch.convert`` (both routes), ``bnfold.torch.calibrate`` still re-estimating every BN, and
``bnfold.torch.drift``. References by hand: Algorithm 2 from forward pre-hooks in float64."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import bnfold.torch as bt  # noqa: E402
from bnfold.errors import BadInputError  # noqa: E402
from bnfold.records import Mode  # noqa: E402

BATCH = 8
EPS = 1e-5


class Net(nn.Module):
    """Conv -> BN (eval: stored statistics) -> ReLU -> Conv -> BN (train: batch statistics) -> pool -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        return self.fc(self.bn2(self.conv2(h)).mean((2, 3)))


def make_net() -> Net:
    torch.manual_seed(0)
    net = Net()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in (net.bn, net.bn2):
            m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
            m.bias.copy_(torch.randn(m.bias.shape, generator=g))
        net.bn.running_mean.copy_(torch.randn(6, generator=g))  # stored statistics, far from the data's
        net.bn.running_var.copy_(0.5 + torch.rand(6, generator=g))
    net.eval()
    net.bn2.train()
    return net


def bn_inputs(net: nn.Module, x: np.ndarray, train: tuple[str, ...]) -> dict[str, list[torch.Tensor]]:
    """Each BN's float64 inputs per batch, with the BNs named in ``train`` normalising per batch."""
    work = copy.deepcopy(net).eval()
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, m in work.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train(name in train)
            m.momentum = 0.0  # the buffers stay as they are
            seen[name] = []
            hooks.append(m.register_forward_pre_hook(
                lambda mod, args, name=name: seen[name].append(args[0].detach().double())))
    with torch.no_grad():
        for i in range(0, len(x), BATCH):
            work(torch.from_numpy(x[i:i + BATCH]))
    for h in hooks:
        h.remove()
    return seen


def alg2(acts: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    m = acts[0].numel() // acts[0].shape[1]  # equal batches here
    means = torch.stack([t.mean((0, 2, 3)) for t in acts]).mean(0)
    variances = torch.stack([t.var((0, 2, 3), unbiased=False) for t in acts]).mean(0) * m / (m - 1)
    return means.numpy(), variances.numpy()


def frozen_with(net: nn.Module, stats: dict[str, tuple[np.ndarray, np.ndarray]]) -> nn.Module:
    frozen = copy.deepcopy(net).eval()
    for name, (mean, var) in stats.items():
        m = frozen.get_submodule(name)
        m.running_mean.copy_(torch.from_numpy(mean).float())
        m.running_var.copy_(torch.from_numpy(var).float())
    return frozen


def eager(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((24, 3, 8, 8)) * 2 + 0.5).astype(np.float32)
    path = tmp_path_factory.mktemp("recal") / "calib.npy"
    np.save(path, x)
    return path, x


def _batches(x: np.ndarray) -> list[torch.Tensor]:
    return [torch.from_numpy(x[i:i + BATCH]) for i in range(0, len(x), BATCH)]


def test_fold_default_keeps_eval_bn_and_calibrates_the_train_bn_through_it(data: tuple[Path, np.ndarray]) -> None:
    _, x = data
    net = make_net()
    stored = net.bn.running_mean.clone()
    result = bt.fold(net, _batches(x), device="cpu")
    recs = {b.name: b for b in result.report.bns}
    assert recs["bn"].stats is None and recs["bn"].mode_before is Mode.INFERENCE and recs["bn"].drift is None
    assert recs["bn2"].stats is not None and recs["bn2"].mode_before is Mode.TRAINING
    mean2, var2 = alg2(bn_inputs(net, x, train=("bn2",))["bn2"])  # 'bn' normalises with its stored stats
    # float32 activations summed in float64: ~1e-7 relative; 1e-5 leaves room
    np.testing.assert_allclose(recs["bn2"].stats.mean, mean2, rtol=1e-5, atol=1e-5 * np.abs(mean2).max())
    np.testing.assert_allclose(recs["bn2"].stats.var, var2, rtol=1e-5)
    want = eager(frozen_with(net, {"bn2": (mean2, var2)}), x[:5])
    np.testing.assert_allclose(eager(result.module, x[:5]), want, rtol=1e-4, atol=1e-5)  # float32 fold rounding
    assert torch.equal(net.bn.running_mean, stored)  # the module passed in is untouched


def test_fold_all_reestimates_every_bn_with_drift(data: tuple[Path, np.ndarray]) -> None:
    _, x = data
    net = make_net()
    result = bt.fold(net, _batches(x), device="cpu", recalibrate="all")
    recs = {b.name: b for b in result.report.bns}
    assert result.report.recalibrate == "all" and all(b.stats is not None for b in recs.values())
    seen = bn_inputs(net, x, train=("bn", "bn2"))  # Algorithm 2's training network
    for name in ("bn", "bn2"):
        mean, var = alg2(seen[name])
        np.testing.assert_allclose(recs[name].stats.mean, mean, rtol=1e-5, atol=1e-5 * np.abs(mean).max())
        np.testing.assert_allclose(recs[name].stats.var, var, rtol=1e-5)
    d = recs["bn"].drift
    assert d is not None and d.mean_shift_sigma_max is not None and d.mean_shift_sigma_max > 0.1
    assert recs["bn2"].drift is not None and recs["bn2"].drift.mean_shift_sigma_max is None
    assert "batch statistics" in recs["bn2"].drift.note
    with pytest.raises(BadInputError, match="recalibrate='all'"):
        bt.fold(net, None, device="cpu", recalibrate="all")


def test_calibrate_still_reestimates_every_bn(data: tuple[Path, np.ndarray]) -> None:
    _, x = data
    net = make_net()
    frozen, stats = bt.calibrate(net, _batches(x), device="cpu")
    assert set(stats) == {"bn", "bn2"}
    mean, _ = alg2(bn_inputs(net, x, train=("bn", "bn2"))["bn"])
    np.testing.assert_allclose(frozen.bn.running_mean.numpy(), mean, rtol=1e-5, atol=1e-5)


def test_drift_matches_a_float64_computation(data: tuple[Path, np.ndarray]) -> None:
    _, x = data
    net = make_net()
    drifts = bt.drift(net, _batches(x), device="cpu")
    mu_d, var_d = alg2(bn_inputs(net, x, train=("bn", "bn2"))["bn"])
    mu_s, var_s = net.bn.running_mean.double().numpy(), net.bn.running_var.double().numpy()
    shift = np.abs(mu_s - mu_d) / np.sqrt(var_d + EPS)
    ratio = np.abs(np.log((var_s + EPS) / (var_d + EPS)))
    d = drifts["bn"]
    assert d.mean_shift_sigma_max == pytest.approx(float(shift.max()), rel=1e-5)  # see the tolerance above
    assert d.log_var_ratio_max == pytest.approx(float(ratio.max()), rel=1e-5, abs=1e-6)
    assert d.worst_channel == int(np.argmax(np.maximum(shift, ratio)))
    assert drifts["bn2"].mean_shift_sigma_max is None and drifts["bn2"].note
    assert not math.isnan(d.mean_shift_sigma_max)


def test_convert_onnx_route_follows_the_option(data: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    import onnxruntime as ort

    path, x = data
    net = make_net()
    out = tmp_path / "net.onnx"
    result = bt.convert(net, path, out, batch_size=BATCH, device="cpu")
    assert result.passed and result.route == "onnx"
    mean2, var2 = alg2(bn_inputs(net, x, train=("bn2",))["bn2"])
    want = eager(frozen_with(net, {"bn2": (mean2, var2)}), x[:5])  # 'bn' keeps its stored statistics
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x[:5]})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)  # float32 export and fold vs eager
    recs = sorted(result.report.bns, key=lambda b: b.stats is None)
    assert [b.stats is not None for b in recs] == [True, False]  # bn2 calibrated (in PyTorch), bn kept
    assert recs[0].mode_before is Mode.TRAINING and result.report.recalibrate == "training"

    out_all = tmp_path / "all.onnx"
    result = bt.convert(net, path, out_all, batch_size=BATCH, device="cpu", recalibrate="all")
    assert result.passed and result.report.recalibrate == "all"
    assert all(b.stats is not None and b.drift is not None for b in result.report.bns)
    by_drift = [b.drift for b in result.report.bns if b.drift is not None and b.drift.mean_shift_sigma_max is not None]
    assert by_drift == [bt.drift(net, _batches(x), device="cpu")["bn"]]  # PyTorch's record, on the ONNX node


def test_convert_torch_route_follows_the_option(data: tuple[Path, np.ndarray]) -> None:
    path, _ = data
    plan = bt.convert(make_net(), path, None, batch_size=BATCH, device="cpu", dry_run=True)
    assert plan.route == "torch"
    assert {b.name: b.stats is not None for b in plan.report.bns} == {"bn": False, "bn2": True}
    plan = bt.convert(make_net(), path, None, batch_size=BATCH, device="cpu", dry_run=True, recalibrate="all")
    assert {b.name: b.stats is not None for b in plan.report.bns} == {"bn": True, "bn2": True}
    assert plan.report.bns[0].drift is not None
