"""Sufficiency on both routes: the ONNX route (onnxruntime) and the PyTorch route give the same
figures on the same model and data, and both equal a float64 numpy computation from the BN's input."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import bnfold  # noqa: E402
import bnfold.torch as bt  # noqa: E402
from bnfold.errors import BadInputError  # noqa: E402
from bnfold.formulas.stats import finalize  # noqa: E402
from bnfold.records import Sufficiency  # noqa: E402
from bnfold.torch.calibrate import _DeviceStats  # noqa: E402

BATCH = 8


class Net(nn.Module):
    """Conv -> BN -> ReLU -> pool -> Linear: the BN's input does not depend on how it normalises."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def _net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def _data() -> np.ndarray:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((26, 3, 6, 6)) + rng.standard_normal((26, 1, 1, 1))  # per-sample offsets
    return x.astype(np.float32)  # 26 = 3 x 8 + 2: a short last batch


def _reference(net: Net, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SE(E)/sigma and RSE(V) per channel from the conv output in float64, written out directly."""
    conv = net.conv.double()
    try:
        acts = [conv(torch.from_numpy(x[i:i + BATCH]).double()).detach().numpy() for i in range(0, len(x), BATCH)]
    finally:
        net.conv.float()
    flat = [np.moveaxis(a, 1, 0).reshape(a.shape[1], -1) for a in acts]
    m = np.array([f.shape[1] for f in flat], dtype=np.float64)[:, None]
    mu = np.array([f.mean(axis=1) for f in flat])
    s2 = np.array([f.var(axis=1) for f in flat])
    k = len(flat)
    e = (m * mu).sum(0) / m.sum()
    v = (m * s2).sum(0) / (m - 1).sum()
    tau2 = (m * (mu - e) ** 2).sum(0) / (k - 1)
    rho2 = ((m - 1) * (m * s2 / (m - 1) - v) ** 2).sum(0) / (k - 1)
    return np.sqrt(tau2 / m.sum()) / np.sqrt(v), np.sqrt(rho2 / (m - 1).sum()) / v


def _onnx(tmp_path: Path, net: Net) -> Path:
    path = tmp_path / "net.onnx"
    torch.onnx.export(net, (torch.randn(2, 3, 6, 6),), str(path), dynamo=False, do_constant_folding=False,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    return path


# Both routes compute the BN input in float32 (onnxruntime's and torch's convolutions); the batch
# means' deviations from E are ~0.1 sigma, so a float32 rounding of ~1e-7 relative in the
# activations moves the figures by ~1e-6 relative. 1e-4 covers that; a wrong weight or a missed
# batch moves them by >= 5 %.
RTOL = 1e-4


def _check(s: Sufficiency, ref_mean: np.ndarray, ref_var: np.ndarray, samples: int) -> None:
    assert s.batches == 4 and s.samples == samples and s.target == 0.02
    assert s.mean_se_sigma_max == pytest.approx(ref_mean.max(), rel=RTOL)
    assert s.var_rse_max == pytest.approx(ref_var.max(), rel=RTOL)
    assert s.worst_channel == int(np.argmax(np.maximum(ref_mean, ref_var)))
    worst = float(np.maximum(ref_mean, ref_var).max())
    assert s.samples_for_target == pytest.approx(samples * (worst / 0.02) ** 2, abs=1 + 1e-3 * s.samples_for_target)


def test_torch_and_onnx_routes_agree_with_numpy(tmp_path: Path) -> None:
    net, x = _net(), _data()
    ref_mean, ref_var = _reference(net, x)
    result = bnfold.fold(_onnx(tmp_path, net), data={"x": x}, batch_size=BATCH, recalibrate="all", dry_run=True,
                         target_se=0.02)
    [rec] = [b for b in result.report.bns if b.stats is not None]
    onnx_suff = rec.stats.sufficiency
    assert onnx_suff is not None
    _check(onnx_suff, ref_mean, ref_var, 26)

    batches = [torch.from_numpy(x[i:i + BATCH]) for i in range(0, len(x), BATCH)]
    _, stats = bt.calibrate(net, batches, device="cpu", target_se=0.02)
    torch_suff = stats["bn"].sufficiency
    assert torch_suff is not None
    _check(torch_suff, ref_mean, ref_var, 26)

    folded = bt.fold(net, batches, device="cpu", recalibrate="all", target_se=0.02)
    [trec] = [b for b in folded.report.bns if b.stats is not None]
    assert trec.stats.sufficiency == torch_suff  # the fold's report carries calibrate's figures
    assert any("miss the 2 % standard-error target" in w for w in folded.report.warnings)


def test_torch_device_accumulator_matches_the_host_one() -> None:
    """The device accumulator (``_DeviceStats.add_moments``: torch float64 tensors, used on GPUs and
    for float16) gives the figures of the CPU path's numpy ``update`` on the same activations."""
    net, x = _net(), _data()
    batches = [torch.from_numpy(x[i:i + BATCH]) for i in range(0, len(x), BATCH)]
    _, host = bt.calibrate(net, batches, device="cpu")
    dev = _DeviceStats("bn")
    with torch.no_grad():
        for b in batches:
            h = net.conv(b).double()
            dev._check(h)  # as batch_stat_norm does before add_moments
            mu = h.mean((0, 2, 3))
            var = (h - mu.view(1, -1, 1, 1)).square().mean((0, 2, 3))
            dev.add_moments(mu, var, h.numel() // h.shape[1], h.shape[0])
    got = finalize(dev.to_bnstats(), "unbiased", "bn").sufficiency
    want = host["bn"].sufficiency
    assert got is not None and want is not None
    # the same float32 conv activations; the CPU path's moments (bnfold.torch.moments) sum the
    # float32 values its own way, ~1e-7 relative, which the ~0.1 sigma deviations of the batch
    # means turn into ~1e-6 on the figures (measured 1.3e-8); a wrong update is off by >= 1e-2
    assert got.mean_se_sigma_max == pytest.approx(want.mean_se_sigma_max, rel=1e-5)
    assert got.var_rse_max == pytest.approx(want.var_rse_max, rel=1e-5)
    assert (got.worst_channel, got.samples, got.batches) == (want.worst_channel, 26, 4)
    assert got.samples_for_target == pytest.approx(want.samples_for_target, abs=1)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_bad_target_is_bad_input(bad: float, tmp_path: Path) -> None:
    net, x = _net(), _data()
    with pytest.raises(BadInputError, match="target_se must be a positive number"):
        bt.calibrate(net, [torch.from_numpy(x)], target_se=bad)
    with pytest.raises(BadInputError, match="target_se must be a positive number"):
        bnfold.fold(_onnx(tmp_path, net), data={"x": x}, dry_run=True, target_se=bad)


@pytest.mark.parametrize("suffix", [".onnx", ".pt2"], ids=["onnx-route", "torch-route"])
def test_convert_passes_the_target_on_both_routes(suffix: str, tmp_path: Path) -> None:
    """``bnfold.torch.convert`` (what the CLI runs for PyTorch models) hands target_se to the
    calibration on either route, and the report carries the figures."""
    net, x = _net(), _data()
    net.bn.train()  # a training-mode BN: calibrated on both routes
    path = tmp_path / "calib.npy"
    np.save(path, x)
    result = bt.convert(net, path, tmp_path / f"out{suffix}", batch_size=BATCH, device="cpu", target_se=0.5)
    assert result.passed
    [rec] = [b for b in result.report.bns if b.stats is not None]
    s = rec.stats.sufficiency
    assert s is not None and s.target == 0.5 and s.batches == 4 and s.samples == 26 and s.met is True
    assert not [w for w in result.report.warnings if "standard-error target" in w]
