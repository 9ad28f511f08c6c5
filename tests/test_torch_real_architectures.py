"""bnfold.torch on real architectures (issue 16 point 5): timm, efficientnet-pytorch, MONAI, and a
segmentation-style module with an ``OrderedDict`` output.

Every model has random weights, BNs with non-trivial affine parameters and running statistics,
and is in train mode (as at the end of training). The oracles:

* **statistics**: ``torch.optim.swa_utils.update_bn`` on a float64 copy, over the same
  equal-size batches, with every Dropout/DropPath probability set to 0: that is Algorithm 2
  (the average of the batch means and of the unbiased batch variances) on the training network
  with the stochastic layers off. bnfold's float32 statistics differ from it by the float32
  rounding of the activations only;
* **the fold**: the calibrated eval-mode module itself (folded and frozen agree in float64 to
  round-off; in float32 within a small multiple of the frozen module's own rounding).

timm's ``BatchNormAct2d`` models and the ``OrderedDict`` segmenter were refused before issue 16's
points 1 and 2 were fixed (``UnsupportedModelError``); they fold now.
"""
from __future__ import annotations

import collections
import copy
import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.nn.modules.batchnorm import _BatchNorm  # noqa: E402
from torch.optim.swa_utils import update_bn  # noqa: E402

from bnfold.records import Action  # noqa: E402
from bnfold.torch import calibrate, fold  # noqa: E402

# float32 statistics against the float64 oracle: the activations reaching a BN carry the float32
# rounding of every layer before it (~1e-7 relative per layer, a few tens of layers, amplified
# where a BN divides by a small spread); measured at most ~1e-5 (variance, relative) and ~1e-5
# standard deviations (mean) on these models. A stale BN (issue 16 point 1) is off by O(1).
STATS_RTOL = 1e-3
# the fold in float64: folded and frozen compute the same function, they differ by the float64
# rounding of the folded weights and of the forward (~1e-16 per op, tens of layers)
FOLD64_RTOL = 1e-10


def _batches(shape: tuple[int, ...], n: int = 4, seed: int = 0) -> list[Any]:
    """``n`` equal-size batches (update_bn weighs every batch alike), an offset and a spread."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * 3 + 1 for _ in range(n)]


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN parameters and running statistics (a stale BN then differs from the oracle)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                if m.affine:
                    m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                    m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
                if m.running_mean is not None:
                    m.running_mean.copy_(0.5 * torch.randn(m.running_mean.shape, generator=g))
                    m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model.train()


def _oracle(model: nn.Module, data: list[Any]) -> nn.Module:
    """Algorithm 2 by update_bn: a float64 copy, Dropout and DropPath off, the same batches."""
    ref = copy.deepcopy(model).double()
    for m in ref.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
        if hasattr(m, "drop_prob"):  # timm DropPath
            m.drop_prob = 0.0
        if hasattr(m, "drop_rate") and isinstance(m.drop_rate, float):  # timm heads: F.dropout(p=drop_rate)
            m.drop_rate = 0.0
    update_bn([x.double() for x in data], ref)
    return ref.eval()


def _stats_error(frozen: nn.Module, oracle: nn.Module) -> tuple[float, float]:
    """Largest relative variance difference and mean difference in oracle standard deviations."""
    ref = dict(oracle.named_modules())
    var_err = mean_err = 0.0
    for name, m in frozen.named_modules():
        if isinstance(m, _BatchNorm):
            o = ref[name]
            sd = o.running_var.sqrt()
            var_err = max(var_err, float(((m.running_var.double() - o.running_var).abs() / o.running_var).max()))
            mean_err = max(mean_err, float(((m.running_mean.double() - o.running_mean).abs() / sd).max()))
    return var_err, mean_err


def _leaves(out: Any) -> list[Any]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _leaves(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _leaves(v)]
    raise TypeError(type(out))


def _forward(model: nn.Module, x: Any) -> list[Any]:
    with torch.no_grad():
        return _leaves(model(x))


def _fold_error(frozen: nn.Module, x: Any) -> float:
    """Fold the frozen module in float64; the largest output difference relative to its scale."""
    f64 = copy.deepcopy(frozen).double()
    res = fold(f64)
    assert res.report.kept == 0, [(b.name, b.reason) for b in res.report.bns if b.action is not Action.FOLDED]
    assert not any(isinstance(m, _BatchNorm) for m in res.module.modules())
    ref, got = _forward(f64, x.double()), _forward(res.module, x.double())
    assert [t.shape for t in got] == [t.shape for t in ref]
    scale = max(1.0, max(float(t.abs().max()) for t in ref))
    return max(float((a - b).abs().max()) for a, b in zip(got, ref)) / scale


def _check(name: str, model: nn.Module, shape: tuple[int, ...]) -> None:
    """Calibrate against the oracle, fold the result against itself, and print the table row."""
    model = _randomise(model)
    n_bn = sum(isinstance(m, _BatchNorm) for m in model.modules())
    data = _batches(shape)
    frozen, stats = calibrate(model, data)
    var_err, mean_err = _stats_error(frozen, _oracle(model, data))
    res = fold(model, data)  # the float32 route: calibrate again, trace, fold
    kept = sorted({f"{b.reason.value if b.reason else '?'}" for b in res.report.bns if b.action is not Action.FOLDED})
    x = _batches(shape, n=1, seed=1)[0]
    err32 = max(float((a - b).abs().max()) for a, b in zip(_forward(res.module, x), _forward(frozen, x)))
    err64 = _fold_error(frozen, x)
    print(f"\n{name}: {n_bn} BN, calibrated {len(stats)}, folded {res.report.folded}, kept {res.report.kept} {kept}, "
          f"stats vs float64 oracle: var {var_err:.1e} rel, mean {mean_err:.1e} sd; "
          f"fold error float64 {err64:.1e} rel, float32 {err32:.1e} abs")
    assert len(stats) == n_bn
    assert var_err <= STATS_RTOL and mean_err <= STATS_RTOL, (var_err, mean_err)
    assert (res.report.folded, res.report.kept) == (n_bn, 0), kept
    assert err64 <= FOLD64_RTOL


# ----------------------------------------------------------------------------- timm

@pytest.fixture(scope="module")
def timm(torchvision_ops: None) -> Any:
    """timm, importable here (skipped where it is not installed). timm imports torchvision, which
    needs the ``torchvision_ops`` fixture of conftest.py to import here."""
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed (pip install timm --no-deps, with torchvision matching this torch)")
    try:
        return importlib.import_module("timm")
    except Exception as exc:
        pytest.skip(f"timm does not import here ({type(exc).__name__}: {exc})")



TIMM_MODELS = [
    pytest.param("efficientnet_b0"),
    pytest.param("mobilenetv3_small_100"),
    pytest.param("rexnet_100"),
    "resnet18",
    "dla34",
    "hrnet_w18_small",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_model(timm: Any, name: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, drop_rate=0.2)
    _check(name, model, (4, 3, 64, 64))


# ----------------------------------------------------------------------------- efficientnet-pytorch, MONAI


def _import_or_skip(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except Exception as exc:  # ImportError, or a package built for another torch
        pytest.skip(f"{name} is not usable here ({type(exc).__name__}: {exc})")


@pytest.mark.slow
def test_efficientnet_pytorch_b0() -> None:
    """lukemelas/efficientnet-pytorch: BNs after same-padding (depthwise) F.conv2d subclasses,
    dropout and drop-connect written with ``self.training`` (off in calibration and oracle)."""
    en = _import_or_skip("efficientnet_pytorch")
    torch.manual_seed(1)
    model = en.EfficientNet.from_name("efficientnet-b0", image_size=64, drop_connect_rate=0.0)
    _check("efficientnet-pytorch b0", model, (4, 3, 64, 64))


@pytest.mark.slow
@pytest.mark.parametrize("dims,shape", [(2, (4, 1, 32, 32)), (3, (4, 1, 16, 16, 16))])
def test_monai_unet(dims: int, shape: tuple[int, ...]) -> None:
    """MONAI UNet with residual units: BNs after Conv and ConvTranspose, 2D and 3D."""
    nets = _import_or_skip("monai.networks.nets")
    torch.manual_seed(2)
    model = nets.UNet(spatial_dims=dims, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2),
                      num_res_units=1, norm="batch", dropout=0.1)
    _check(f"monai UNet {dims}d", model, shape)


# ----------------------------------------------------------------------------- dict outputs


class TinySegmenter(nn.Module):
    """torchvision-segmentation style: a backbone, a main and an auxiliary head, and an
    ``OrderedDict(out=..., aux=...)`` output upsampled to the input size."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Conv2d(16, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Dropout(0.1), nn.Conv2d(8, 4, 1))
        self.aux = nn.Sequential(nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))

    def forward(self, x: torch.Tensor) -> collections.OrderedDict[str, torch.Tensor]:
        f = self.backbone(x)
        size = x.shape[-2:]
        up: Callable[[torch.Tensor], torch.Tensor] = lambda t: nn.functional.interpolate(  # noqa: E731
            t, size=size, mode="bilinear", align_corners=False)
        return collections.OrderedDict(out=up(self.head(f)), aux=up(self.aux(f)))


def test_segmentation_dict_output_calibrates_like_update_bn() -> None:
    torch.manual_seed(3)
    model = _randomise(TinySegmenter())
    data = _batches((4, 3, 32, 32))
    frozen, stats = calibrate(model, data)
    assert len(stats) == 4
    var_err, mean_err = _stats_error(frozen, _oracle(model, data))
    assert var_err <= STATS_RTOL and mean_err <= STATS_RTOL, (var_err, mean_err)
    x = _batches((2, 3, 32, 32), n=1, seed=1)[0]
    with torch.no_grad():
        y = frozen(x)
    assert type(y) is collections.OrderedDict and list(y) == ["out", "aux"]


def test_segmentation_dict_output_folds() -> None:
    torch.manual_seed(3)
    _check("segmentation (OrderedDict output)", TinySegmenter(), (4, 3, 32, 32))
