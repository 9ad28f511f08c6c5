"""bnfold.torch.trace and the fold's safety rules around what torch.fx cannot see.

Every case here was a silent wrong answer once: a folded module that differs from the frozen one
with every BN reported FOLDED. The reference is always the frozen (calibrated, eval-mode) module
on the same inputs, in float64 so that a correct fold agrees to round-off.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from bnfold.errors import BadInputError, UnsupportedModelError  # noqa: E402
from bnfold.records import Action, Reason  # noqa: E402
from bnfold.torch import calibrate, fold  # noqa: E402
from bnfold.torch.batches import Batch  # noqa: E402
from bnfold.torch.trace import hooked_modules, trace  # noqa: E402


def data(shape=(3, 8, 8), sizes=(4, 4, 3), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((n, *shape), generator=g, dtype=dtype) for n in sizes]


def conv_bn(dims: int = 2) -> nn.Sequential:
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    return nn.Sequential(conv(3, 4, 3), bn(4)).double()


def frozen_and_folded(model: nn.Module, batches, **kw):
    frozen, _ = calibrate(model, batches)
    res = fold(model, batches, **kw)
    return frozen, res


def assert_same(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        ra, rb = a(x), b(x)
    scale = max(1.0, float(ra.abs().max()))
    assert float((ra - rb).abs().max()) <= 1e-11 * scale


# ----------------------------------------------------------------------------- hooks


@pytest.mark.parametrize("kind", ["forward", "pre", "producer"])
def test_hook_on_a_bn_or_its_producer_keeps_that_bn(kind):
    model = conv_bn()
    if kind == "forward":
        model[1].register_forward_hook(lambda mod, i, o: o * 2 + 1)
    elif kind == "pre":
        model[1].register_forward_pre_hook(lambda mod, i: (i[0] * 0.5,))
    else:
        model[0].register_forward_hook(lambda mod, i, o: torch.relu(o))
    batches = data()
    frozen, res = frozen_and_folded(model, batches)
    (rec,) = res.report.bns
    assert rec.action is Action.FROZEN_KEPT and rec.reason is Reason.HOOKED
    assert_same(frozen, res.module, batches[0])


def test_output_changing_hook_on_the_root_is_refused():
    model = conv_bn()
    model.register_forward_hook(lambda mod, i, o: o + 100)
    assert hooked_modules(model) == [""]
    with pytest.raises(UnsupportedModelError, match="computes something else on the data"):
        fold(model, data())


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_observer_hook_on_a_traced_through_block_folds_with_a_warning():
    model = nn.Sequential(Block(), nn.ReLU()).double()
    seen = []
    model[0].register_forward_hook(lambda mod, i, o: seen.append(o.shape))
    assert hooked_modules(model) == ["0"]
    batches = data()
    frozen, res = frozen_and_folded(model, batches)
    assert [r.action for r in res.report.bns] == [Action.FOLDED]
    assert any("forward hooks on '0'" in w for w in res.report.warnings)
    assert_same(frozen, res.module, batches[0])


def test_hooks_without_data_or_example_are_refused():
    model = nn.Sequential(Block(), nn.ReLU()).double().eval()
    model[0].register_forward_hook(lambda mod, i, o: None)
    with pytest.raises(UnsupportedModelError, match="forward hooks"):
        fold(model)
    res = fold(model, example_inputs=data()[0])  # with an example the trace is checked instead
    assert [r.action for r in res.report.bns] == [Action.FOLDED]


def test_global_forward_hooks_count():
    model = conv_bn()
    handle = nn.modules.module.register_module_forward_hook(lambda mod, i, o: None)
    try:
        assert "(global forward hooks)" in hooked_modules(model)
    finally:
        handle.remove()
    assert hooked_modules(model) == []


# ----------------------------------------------------------------------------- what fx decides once


class IsInstanceResidual(nn.Module):
    """``isinstance(x, Tensor)`` is False for an fx proxy: the residual vanishes from the trace."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if isinstance(x, torch.Tensor):
            y = y + x
        return y


def test_isinstance_branch_lost_by_tracing_is_refused():
    model = IsInstanceResidual().double()
    with pytest.raises(UnsupportedModelError, match="computes something else"):
        fold(model, data())
    with pytest.raises(UnsupportedModelError, match="computes something else"):
        fold(model.eval(), example_inputs=data()[0])


class OptionalMask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x, mask=None):
        y = self.bn(self.conv(x))
        if mask is not None:
            y = y * mask
        return y


def test_optional_argument_the_data_omits_is_traced_as_none():
    model = OptionalMask().double()
    batches = data()
    frozen, res = frozen_and_folded(model, batches)
    assert [r.action for r in res.report.bns] == [Action.FOLDED]
    assert_same(frozen, res.module, batches[0])


def test_optional_argument_the_data_gives_stays_an_input():
    model = OptionalMask().double()
    g = torch.Generator().manual_seed(5)
    batches = [{"x": x, "mask": torch.rand((x.shape[0], 4, 6, 6), generator=g, dtype=torch.float64)}
               for x in data()]
    frozen, _ = calibrate(model, batches)
    res = fold(model, batches)
    assert [r.action for r in res.report.bns] == [Action.FOLDED]
    with torch.no_grad():
        ref, got = frozen(**batches[0]), res.module(**batches[0])
    assert float((ref - got).abs().max()) <= 1e-11 * max(1.0, float(ref.abs().max()))


class Spectrum(nn.Module):
    """A complex output: the trace check compares real and imaginary parts."""

    def __init__(self, mistraced: bool) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3)
        self.bn = nn.BatchNorm1d(4)
        self.mistraced = mistraced

    def forward(self, x):
        y = torch.fft.rfft(self.bn(self.conv(x)))
        if self.mistraced and isinstance(x, torch.Tensor):  # the branch fx loses flips the phase
            y = y.conj()
        return y


def test_complex_outputs_are_compared_in_full():
    with pytest.raises(UnsupportedModelError, match="computes something else"):
        fold(Spectrum(mistraced=True).double(), data((3, 16)))
    model = Spectrum(mistraced=False).double()
    batches = data((3, 16))
    frozen, res = frozen_and_folded(model, batches)
    assert [r.action for r in res.report.bns] == [Action.FOLDED]
    with torch.no_grad():
        ref, got = frozen(batches[0]), res.module(batches[0])
    assert torch.allclose(got, ref, rtol=0, atol=1e-11 * float(ref.abs().max()))


def test_trace_check_names_data_that_does_not_fit_as_bad_input():
    model = conv_bn().eval()
    with pytest.raises(BadInputError, match="forward failed on the data"):
        trace(model, Batch(args=(torch.zeros(2, 5, 8, 8, dtype=torch.float64),)))


def test_monai_basic_unet_is_refused_not_folded_wrong():
    """MONAI's UpCat concatenates its skip only when ``torch.jit.isinstance(x_e, Tensor)``; under
    fx that is False, and the traced BasicUNet does not even run."""
    monai = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(0)
    model = monai.BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=(4, 4, 8, 8, 16, 4),
                            norm="batch")
    batches = [torch.randn(2, 1, 32, 32) for _ in range(2)]
    with pytest.raises(UnsupportedModelError, match="fails on the data|computes something else"):
        fold(model, batches)


# ----------------------------------------------------------------------------- ranks without data


def test_conv1d_bn1d_without_data_is_unknown_rank_and_folds_with_an_example():
    """BatchNorm1d takes (N, C) too: after an unbatched Conv1d it normalises the length axis."""
    model = conv_bn(1).eval()
    res = fold(model)
    (rec,) = res.report.bns
    assert rec.action is Action.FROZEN_KEPT and rec.reason is Reason.UNKNOWN_RANK
    x = torch.randn(2, 3, 10, dtype=torch.float64)
    res2 = fold(model, example_inputs=x)
    assert [r.action for r in res2.report.bns] == [Action.FOLDED]
    assert_same(model, res2.module, x)
    # the unbatched call the rank check guards against: folding it would be wrong
    unbatched = torch.randn(3, 6, dtype=torch.float64)  # conv output (4, 4): BN1d sees N=4, C=4
    res3 = fold(model, example_inputs=unbatched)
    assert [r.reason for r in res3.report.bns] == [Reason.CHANNEL_MISMATCH]
    assert_same(model, res3.module, unbatched)


@pytest.mark.parametrize("dims", [2, 3])
def test_conv_bn_of_a_fixed_rank_folds_without_data(dims):
    model = conv_bn(dims).eval()
    res = fold(model)
    assert [r.action for r in res.report.bns] == [Action.FOLDED]
    x = torch.randn((2, 3) + (7,) * dims, dtype=torch.float64)
    assert_same(model, res.module, x)


def test_conv2d_into_bn1d_can_only_be_unbatched():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm1d(4)).double().eval()
    res = fold(model)
    assert [r.reason for r in res.report.bns] == [Reason.CHANNEL_MISMATCH]


# ----------------------------------------------------------------------------- reduced precision


def test_float16_statistics_past_its_range_are_refused_untouched():
    """Activations finite in float16 (|x| < 3000), their variance (~1.6e5) is not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).half()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.zero_()
    batches = [torch.randn(4, 3, 8, 8).mul(230).half() for _ in range(3)]
    before = model[1].running_var.clone()
    with pytest.raises(BadInputError, match="past what its torch.float16 running statistics can hold"):
        calibrate(model, batches, inplace=True)
    assert torch.equal(model[1].running_var, before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_statistics_match_float32(dtype):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    batches = [torch.randn(4, 3, 8, 8) * 3 + 1 for _ in range(3)]
    _, ref = calibrate(model, batches)
    low = [b.to(dtype) for b in batches]
    _, got = calibrate(model.to(dtype), low)
    # the inputs and weights are rounded to 8 (bf16) or 11 (fp16) bits: a few of those ulps
    rel = {torch.float16: 5e-3, torch.bfloat16: 4e-2}[dtype]
    np.testing.assert_allclose(got["1"].var, ref["1"].var, rtol=rel)
    np.testing.assert_allclose(got["1"].mean, ref["1"].mean, rtol=rel, atol=rel * np.sqrt(ref["1"].var.max()))
