"""bnfold.torch.fold: fold BN modules into their producers, checked against the frozen model.

"Frozen" is the module that ``calibrate`` returns (eval mode, population statistics); the folded
module must compute the same function. Exactness is checked in float64 (the frozen model cast to
double and folded there: differences at round-off, ~1e-13), the float32 results against the
float32 rounding that the frozen model itself has.
"""
from __future__ import annotations

import copy
import importlib
import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval  # noqa: E402

from bnfold.errors import BadInputError, UnsupportedModelError  # noqa: E402
from bnfold.records import Action, Mode, Reason
from bnfold.run_records import Report
from bnfold.torch import TorchFoldResult, calibrate, fold  # noqa: E402


def batches(shape, sizes=(4, 4, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((n, *shape), generator=g) for n in sizes]


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial affine parameters (a fresh BN has gamma=1, beta=0)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            with torch.no_grad():
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return model


def out(model, *args):
    with torch.no_grad():
        return model(*args)


def assert_float64_exact(frozen: nn.Module, x: torch.Tensor, example_inputs=None) -> TorchFoldResult:
    """Fold the frozen model in float64: folded and frozen agree to round-off."""
    f64 = copy.deepcopy(frozen).double()
    res = fold(f64, example_inputs=example_inputs)
    ref = out(f64, x.double())
    got = out(res.module, x.double())
    scale = max(1.0, float(ref.abs().max()))
    assert float((got - ref).abs().max()) <= 1e-11 * scale
    return res


def assert_float32_close(frozen: nn.Module, folded: nn.Module, x: torch.Tensor, factor: float = 8.0) -> None:
    """Float32 folded vs frozen, with a tolerance from the frozen model's own float32 rounding.

    The exact function is the frozen model in float64. The folded float32 model may differ from it
    by rounding too (its weights are rounded once more); it must stay within a small multiple of
    the frozen float32 model's own error, plus a relative 1e-6 of the output scale.
    """
    exact = out(copy.deepcopy(frozen).double(), x.double())
    err_frozen = float((out(frozen, x).double() - exact).abs().max())
    err_folded = float((out(folded, x).double() - exact).abs().max())
    assert err_folded <= factor * err_frozen + 1e-6 * float(exact.abs().max()), (err_folded, err_frozen)


def record(report: Report, name: str):
    return next(b for b in report.bns if b.name == name)


# ----------------------------------------------------------------------------- convolutions


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2, "depthwise"])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_groups_fold_exactly(dims, groups, bias):
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    g = 4 if groups == "depthwise" else groups
    torch.manual_seed(1)
    model = randomise_bn(nn.Sequential(conv(4, 4 if groups == "depthwise" else 6, 3, padding=1, groups=g, bias=bias),
                                       bn(4 if groups == "depthwise" else 6), nn.ReLU()))
    spatial = (5,) * dims
    data = batches((4, *spatial))
    frozen, _ = calibrate(model, data)
    res = fold(model, data)
    assert res.report.folded == 1 and res.report.kept == 0
    rec = record(res.report, "1")
    assert (rec.action, rec.target, rec.direction, rec.mode_before) == (Action.FOLDED, "0", "backward", Mode.TRAINING)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in res.module.modules())
    x = torch.randn(3, 4, *spatial)
    assert_float32_close(frozen, res.module, x)
    assert_float64_exact(frozen, x)


@pytest.mark.parametrize("dims,groups", [(2, 1), (2, 2), (2, "depthwise"), (1, 2), (3, 2)])
def test_conv_transpose_groups_fold_exactly(dims, groups):
    convt = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    g = 4 if groups == "depthwise" else groups
    c_out = 4 if groups == "depthwise" else 6
    torch.manual_seed(2)
    model = randomise_bn(nn.Sequential(convt(4, c_out, 3, stride=2, groups=g), bn(c_out)))
    spatial = (4,) * dims
    data = batches((4, *spatial))
    frozen, _ = calibrate(model, data)
    res = fold(model, data)
    assert record(res.report, "1").action is Action.FOLDED
    x = torch.randn(2, 4, *spatial)
    assert_float32_close(frozen, res.module, x)
    assert_float64_exact(frozen, x)


@pytest.mark.parametrize("groups,c_in,c_out", [(2, 4, 6), (4, 4, 4)])
def test_torch_fuse_conv_bn_is_wrong_for_grouped_conv_transpose(groups, c_in, c_out):
    torch.manual_seed(3)
    model = randomise_bn(nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 3, groups=groups), nn.BatchNorm2d(c_out)))
    frozen, _ = calibrate(model, batches((c_in, 5, 5)))
    x = torch.randn(2, c_in, 5, 5)
    ref = out(frozen, x)
    try:
        torch_fused = fuse_conv_bn_eval(copy.deepcopy(frozen[0]), copy.deepcopy(frozen[1]), transpose=True)
        torch_out = out(torch_fused, x)
        torch_wrong = torch_out.shape != ref.shape or not torch.allclose(torch_out, ref, rtol=1e-3, atol=1e-3)
    except (RuntimeError, ValueError):
        torch_wrong = True
    assert torch_wrong, "torch's fuse_conv_bn_eval got grouped ConvTranspose right: revisit pitfalls.md"
    ours = fold(frozen).module
    torch.testing.assert_close(out(ours, x), ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- Linear


def test_linear_bn1d_affine_false_folds_where_torch_raises():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5, affine=False), nn.ReLU(), nn.Linear(5, 3, bias=False),
                          nn.BatchNorm1d(3))
    randomise_bn(model)
    data = batches((6,))
    frozen, _ = calibrate(model, data)
    with pytest.raises((TypeError, AttributeError)):
        fuse_linear_bn_eval(copy.deepcopy(frozen[0]), copy.deepcopy(frozen[1]))
    res = fold(model, data)
    assert [b.action for b in res.report.bns] == [Action.FOLDED, Action.FOLDED]
    assert [b.target for b in res.report.bns] == ["0", "3"]
    x = torch.randn(7, 6)
    assert_float32_close(frozen, res.module, x)
    assert_float64_exact(frozen, x, example_inputs=x.double())


def test_linear_needs_the_bn_input_rank():
    """Linear acts on the last axis, BatchNorm1d on axis 1: only (N, C) folds."""
    torch.manual_seed(5)
    flat = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)).eval()
    seq = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)).eval()  # on (N, 5, 6): axis 1 is not the features
    randomise_bn(flat)
    randomise_bn(seq)
    assert record(fold(flat).report, "1").reason is Reason.UNKNOWN_RANK
    assert record(fold(flat, example_inputs=torch.randn(2, 6)).report, "1").action is Action.FOLDED
    x = torch.randn(3, 5, 6)
    res = fold(seq, example_inputs=x)
    rec = record(res.report, "1")
    assert (rec.action, rec.reason) == (Action.FROZEN_KEPT, Reason.CHANNEL_MISMATCH)
    torch.testing.assert_close(out(res.module, x), out(seq, x), rtol=0, atol=0)


# ----------------------------------------------------------------------------- graph structure


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv1(x)
        z = self.bn2(self.conv2(torch.relu(self.bn1(y))))
        return torch.relu(z + y)  # conv1's output also feeds the skip


def test_residual_producer_fanout_is_kept():
    torch.manual_seed(6)
    model = randomise_bn(Residual())
    data = batches((4, 5, 5))
    frozen, stats = calibrate(model, data)
    res = fold(model, data)
    r1, r2 = record(res.report, "bn1"), record(res.report, "bn2")
    assert (r1.action, r1.reason) == (Action.FROZEN_KEPT, Reason.PRODUCER_FANOUT)
    assert "add" in r1.detail
    assert (r2.action, r2.target) == (Action.FOLDED, "conv2")
    assert r1.stats is stats["bn1"] or np.array_equal(r1.stats.var, stats["bn1"].var)
    kept = res.module.get_submodule("bn1")
    assert not kept.training and kept.track_running_stats
    x = torch.randn(2, 4, 5, 5)
    assert_float32_close(frozen, res.module, x)
    assert_float64_exact(frozen, x)


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(3)
        self.bn_b = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn_b(self.conv(torch.relu(self.bn_a(self.conv(x)))))


class TiedWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 3, 1)
        self.c2 = nn.Conv2d(3, 3, 1)
        self.c2.weight = self.c1.weight
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.c1(x)) + self.c2(x)


class FunctionalShared(nn.Module):
    """One parameter read by two F.conv2d calls, only the first followed by a BN."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 3, 3, 3) * 0.3)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(F.conv2d(x, self.w, padding=1)) + F.conv2d(x, self.w, padding=1)


def test_shared_module_and_tied_weights_fold_into_private_copies():
    """As on the ONNX path, a producer whose weights serve other calls (a module called twice, a
    weight tied to another layer, a parameter read by two functional calls) folds into a copy of
    its own (SHARED_WEIGHT_CLONED); the other calls keep the original weights."""
    torch.manual_seed(7)
    x = torch.randn(2, 3, 5, 5)
    model = randomise_bn(SharedConv())
    data = batches((3, 5, 5))
    frozen, _ = calibrate(model, data)
    res = fold(model, data)
    for name in ("bn_a", "bn_b"):
        rec = record(res.report, name)
        assert (rec.action, rec.reason) == (Action.FOLDED, Reason.SHARED_WEIGHT_CLONED), rec
        assert "private copy" in rec.detail
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in res.module.modules())
    torch.testing.assert_close(out(res.module, x), out(frozen, x), rtol=1e-5, atol=1e-5)

    tied = randomise_bn(TiedWeights()).eval()
    w_before = tied.c1.weight.detach().clone()
    res = fold(tied)
    rec = record(res.report, "bn")
    assert (rec.action, rec.reason) == (Action.FOLDED, Reason.SHARED_WEIGHT_CLONED)
    torch.testing.assert_close(out(res.module, x), out(tied, x), rtol=1e-5, atol=1e-5)
    assert torch.equal(res.module.c2.weight, w_before)  # the other layer keeps the tied, unscaled weight

    fn = randomise_bn(FunctionalShared()).eval()
    w_before = fn.w.detach().clone()
    res = fold(fn)
    rec = record(res.report, "bn")
    assert (rec.action, rec.reason) == (Action.FOLDED, Reason.SHARED_WEIGHT_CLONED)
    torch.testing.assert_close(out(res.module, x), out(fn, x), rtol=1e-5, atol=1e-5)
    assert torch.equal(res.module.w, w_before)
    assert torch.equal(fn.w, w_before)


class FunctionalConv(nn.Module):
    """A conv written with F.conv2d on its own parameters (as EfficientNet's same-padding conv)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 2, 3, 3) * 0.3)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn(F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, None, 1, 0, 1, 2))


def test_functional_conv_on_parameters_folds_and_gains_a_bias():
    torch.manual_seed(8)
    model = randomise_bn(FunctionalConv())
    data = batches((4, 5, 5))
    frozen, _ = calibrate(model, data)
    res = fold(model, data)
    rec = record(res.report, "bn")
    assert (rec.action, rec.target) == (Action.FOLDED, "weight")
    assert "bias" in dict(res.module.named_parameters())
    x = torch.randn(2, 4, 5, 5)
    assert_float32_close(frozen, res.module, x)
    assert_float64_exact(frozen, x)


class NoProducer(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn_in = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn_act = nn.BatchNorm2d(3)
        self.bn_ch = nn.BatchNorm1d(3)
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        y = self.bn_act(torch.relu(self.conv(self.bn_in(x))))
        return y, self.bn_ch(self.lin(y.flatten(2).mean(2)[:, :1].expand(-1, 4)))


def test_no_producer_and_unsupported_producer_reasons():
    torch.manual_seed(9)
    model = randomise_bn(NoProducer())
    data = batches((3, 4, 4))
    frozen, _ = calibrate(model, data)
    res = fold(model, data)
    assert record(res.report, "bn_in").reason is Reason.NO_PRODUCER
    rec = record(res.report, "bn_act")
    assert rec.reason is Reason.UNSUPPORTED_PRODUCER and "relu" in rec.detail
    assert record(res.report, "bn_ch").action is Action.FOLDED
    x = torch.randn(2, 3, 4, 4)
    for a, b in zip(out(res.module, x), out(frozen, x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


class ReuseBn(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3)
        self.b = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.a(x)) + self.bn(self.b(x))


def test_reused_bn_folds_into_each_producer_with_the_flag():
    torch.manual_seed(10)
    model = randomise_bn(ReuseBn())
    data = batches((3, 6, 6))
    with pytest.raises(BadInputError, match="allow_reused_bn"):
        fold(model, data)
    res = fold(model, data, allow_reused_bn=True)
    rec = record(res.report, "bn")
    assert (rec.action, rec.target) == (Action.FOLDED, "a, b")
    assert any("2 places" in w for w in res.report.warnings)
    frozen, _ = calibrate(model, data, allow_reused_bn=True)
    x = torch.randn(2, 3, 6, 6)
    assert_float32_close(frozen, res.module, x)


# ----------------------------------------------------------------------------- modes, errors, API


def test_without_data_training_mode_is_refused_and_eval_mode_keeps_its_statistics():
    torch.manual_seed(11)
    model = randomise_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    with pytest.raises(BadInputError, match=r"'1'.*calibration data"):
        fold(model)  # a fresh module is in training mode
    trs = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    with pytest.raises(BadInputError, match="calibration data"):
        fold(trs)
    model.eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    res = fold(model)
    rec = record(res.report, "1")
    assert (rec.mode_before, rec.action, rec.stats) == (Mode.INFERENCE, Action.FOLDED, None)
    assert res.report.calibrated is False and res.report.batch_size is None
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(out(res.module, x), out(model, x), rtol=1e-5, atol=1e-5)


def test_report_fields():
    torch.manual_seed(12)
    model = randomise_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4)))
    model[3].eval()
    res = fold(model, batches((3, 5, 5), sizes=(4, 4, 2)), estimator="pooled")
    rep = res.report
    assert isinstance(rep, Report)
    assert (rep.estimator, rep.batch_size, rep.calibrated) == ("pooled", 4, True)
    assert rep.extra["calibration_samples"] == 10 and rep.extra["frontend"] == "torch"
    r1, r3 = record(rep, "1"), record(rep, "3")
    assert (r1.mode_before, r3.mode_before) == (Mode.TRAINING, Mode.INFERENCE)  # as they were before fold
    assert r1.channels == 4 and r1.stats is not None
    np.testing.assert_array_equal(r1.stats.var, r1.stats.var_pooled)
    assert (r3.action, r3.reason) == (Action.FROZEN_KEPT, Reason.UNSUPPORTED_PRODUCER)
    assert rep.folded == 1 and rep.kept == 1


def test_estimator_gap_warning():
    """Spatially correlated features with one image per batch: Algorithm 2 is far below pooled."""
    g = torch.Generator().manual_seed(13)
    data = [torch.randn(1, 2, 1, 1, generator=g) + 0.05 * torch.randn(1, 2, 6, 6, generator=g) for _ in range(6)]
    model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))
    res = fold(model, data)
    assert any("differ by more than 10%" in w and "1 (" in w for w in res.report.warnings)


def test_dtype_overflow_is_kept_with_the_reason():
    conv = nn.Conv2d(3, 4, 3).half()
    with torch.no_grad():
        conv.weight.fill_(0.5)
    bn = nn.BatchNorm2d(4, eps=1e-12).half().eval()
    with torch.no_grad():
        bn.running_var.fill_(1e-7)  # s ~ 3000: 0.5 * s fits; make it overflow float16
        bn.weight.fill_(100.0)
    model = nn.Sequential(conv, bn).eval()
    res = fold(model)
    rec = record(res.report, "1")
    assert (rec.action, rec.reason) == (Action.FROZEN_KEPT, Reason.DTYPE_OVERFLOW)
    assert "float16" in rec.detail
    assert torch.equal(res.module.get_submodule("0").weight, conv.weight)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        if x.sum() > 0:
            return self.bn(self.conv(x))
        return x


def test_untraceable_model_says_tracing_failed_before_calibrating():
    consumed = []

    def gen():
        consumed.append(1)
        yield torch.randn(2, 3, 4, 4)

    with pytest.raises(UnsupportedModelError, match=r"tracing failed.*ONNX") as info:
        fold(DataDependent(), gen())
    assert "\n" not in str(info.value)
    assert consumed == []


def test_callers_module_untouched_unless_inplace_and_state_dict_loads():
    torch.manual_seed(14)
    model = randomise_bn(Residual()).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = batches((4, 5, 5))
    res = fold(model, data)
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # state dict round trip into a second fold of the same architecture
    buf = io.BytesIO()
    torch.save(res.module.state_dict(), buf)
    other = fold(randomise_bn(Residual(), seed=5), data).module
    other.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(out(other, x), out(res.module, x), rtol=0, atol=0)

    # inplace: the module itself becomes the frozen model, the result still folds
    res2 = fold(model, data, inplace=True)
    assert not model.training
    assert_float32_close(model, res2.module, x)
    torch.testing.assert_close(out(res2.module, x), out(res.module, x), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- real architectures


def _import_or_skip(name: str):
    try:
        return importlib.import_module(name)
    except Exception as exc:  # ImportError, or a package built for another torch
        pytest.skip(f"{name} is not usable here ({type(exc).__name__}: {exc}); "
                    f"pip install --no-deps {name.replace('_', '-')}")


def test_efficientnet_b0_depthwise_same_padding():
    """EfficientNet-b0 (lukemelas/efficientnet-pytorch): 49 BNs after (depthwise) convolutions written
    with F.conv2d in a same-padding Conv2d subclass; every one folds."""
    en = _import_or_skip("efficientnet_pytorch")
    torch.manual_seed(15)
    model = en.EfficientNet.from_name("efficientnet-b0", image_size=32)  # no pretrained weights
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert n_bn == 49
    data = batches((3, 32, 32), sizes=(4, 3))
    frozen, _ = calibrate(model, data)
    res = fold(model, data)
    assert (res.report.folded, res.report.kept) == (49, 0)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in res.module.modules())
    assert any("_depthwise_conv" in b.target for b in res.report.bns)
    x = torch.randn(2, 3, 32, 32)
    assert_float32_close(frozen, res.module, x)
    assert_float64_exact(frozen, x)


@pytest.mark.parametrize("dims,shape", [(2, (2, 1, 32, 32)), (3, (2, 1, 16, 16, 16))])
def test_monai_unet_with_conv_transpose_and_batchnorm(dims, shape):
    monai_nets = _import_or_skip("monai.networks.nets")
    torch.manual_seed(16)
    model = monai_nets.UNet(spatial_dims=dims, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2),
                            num_res_units=1, norm="batch")
    randomise_bn(model)
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    g = torch.Generator().manual_seed(17)
    data = [torch.randn(shape, generator=g) for _ in range(3)]
    frozen, _ = calibrate(model, data)
    res = fold(model, data)
    assert (res.report.folded, res.report.kept) == (n_bn, 0) == (6, 0)
    convt = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]
    folded_into_convt = [b for b in res.report.bns
                         if isinstance(frozen.get_submodule(b.target), convt)]
    assert len(folded_into_convt) == 2
    x = torch.randn(shape, generator=g)
    assert_float32_close(frozen, res.module, x)
    assert_float64_exact(frozen, x)


class Chained(nn.Module):
    """conv -> bn_late -> bn_early, with the BN registered first applied last."""

    def __init__(self):
        super().__init__()
        self.bn_early = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn_late = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn_early(self.bn_late(self.conv(x)))


def test_chained_bns_both_fold_whatever_their_registration_order():
    torch.manual_seed(18)
    model = randomise_bn(Chained())
    data = batches((3, 5, 5))
    frozen, _ = calibrate(model, data)
    res = fold(model, data)
    assert [b.name for b in res.report.bns] == ["bn_early", "bn_late"]  # module order in the report
    assert [(b.action, b.target) for b in res.report.bns] == [(Action.FOLDED, "conv")] * 2
    x = torch.randn(2, 3, 5, 5)
    assert_float32_close(frozen, res.module, x)
    assert_float64_exact(frozen, x)


def test_torch_report_renders_and_follows_the_report_schema():
    import json
    from pathlib import Path

    jsonschema = pytest.importorskip("jsonschema")
    from bnfold.report import json_report, summary

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4))
    res = fold(model, batches((3, 5, 5)))
    schema = json.loads((Path(__file__).resolve().parents[1] / "docs" / "report-schema.json").read_text())
    jsonschema.validate(json_report.report_to_dict(res.report), schema)
    text = summary.summary_text(res.report)
    assert "folded 1" in text and "UNSUPPORTED_PRODUCER" in text
