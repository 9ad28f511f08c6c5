"""rules.FORWARD: a BN folded forward into the unpadded Conv that reads its output."""
from __future__ import annotations

import npref
import numpy as np
import pytest
from conftest import init, rand, vi
from onnx import helper
from rulecase import refusal, scale_shift, view

from bnfold.records import Reason
from bnfold.rules import FORWARD, FoldAttrs, Match


def _conv(w, b=None, *, w_const=True, b_const=True, **attrs):
    ins = ["x", "w"] + (["b"] if b is not None else [])
    node = helper.make_node("Conv", ins, ["y"], name="c", **attrs)
    inits = [init("w", w)] if w_const else []
    inputs = [vi("x", w.ndim)] + ([] if w_const else [vi("w", list(w.shape))])
    if b is not None:
        if b_const:
            inits.append(init("b", b))
        else:
            inputs.append(vi("b", [len(b)]))
    return node, view(node, inputs, [vi("y", w.ndim)], inits)


@pytest.mark.parametrize("group,attrs", [(1, {}), (2, {"pads": [0, 0, 0, 0]}), (3, {"auto_pad": "VALID"}),
                                         (1, {"auto_pad": "NOTSET"})])
def test_match_accepts_an_unpadded_conv(rng, group, attrs):
    node, g = _conv(rand(rng, 6, 2, 3, 3), rand(rng, 6), group=group, **attrs)
    assert FORWARD.match(node, g, 2 * group) == Match(2 * group, 4)
    assert FORWARD.match(node, g, None) == Match(2 * group, 4)


@pytest.mark.parametrize("attrs", [{"pads": [1, 0, 0, 0]}, {"auto_pad": "SAME_UPPER"}, {"auto_pad": "SAME_LOWER"}])
def test_refuses_a_padded_conv(rng, attrs):
    node, g = _conv(rand(rng, 4, 2, 3, 3), **attrs)
    assert refusal(FORWARD.match, node, g, 2) == (
        Reason.PADDED_FORWARD_FOLD, "following Conv 'c' pads its input (zeros, not the BN shift)")


def test_refuses_computed_or_integer_parameters_and_a_channel_mismatch(rng):
    node, g = _conv(rand(rng, 4, 2, 3, 3), w_const=False)
    assert refusal(FORWARD.match, node, g, 2) == (Reason.NOT_CONSTANT, "weight of Conv 'c' is not a constant")
    node, g = _conv(rand(rng, 4, 2, 3, 3), rand(rng, 4), b_const=False)
    assert refusal(FORWARD.match, node, g, 2) == (Reason.NOT_CONSTANT, "bias of Conv 'c' is not a constant")
    node, g = _conv(np.ones((4, 2, 3, 3), np.int64))
    assert refusal(FORWARD.match, node, g, 2)[0] is Reason.UNSUPPORTED_DTYPE
    node, g = _conv(rand(rng, 4, 2, 3, 3), group=2)
    assert refusal(FORWARD.match, node, g, 3) == (Reason.CHANNEL_MISMATCH, "Conv 'c' takes 4 channels, BN has 3")


@pytest.mark.parametrize("dims,groups,c_in,c_out,bias", [(1, 1, 3, 4, True), (2, 2, 4, 6, False), (2, 4, 4, 8, True),
                                                          (3, 1, 2, 3, True)])
def test_folded_tensors_compute_bn_then_conv(rng, dims, groups, c_in, c_out, bias):
    w = rng.standard_normal((c_out, c_in // groups) + (2,) * dims)
    b = rng.standard_normal(c_out) if bias else None
    bn, s, t = scale_shift(rng, c_in)
    x = rng.standard_normal((2, c_in) + (4,) * dims)
    w2, b2 = FORWARD.fold(w, b, s, t, FoldAttrs(group=groups))
    expect = npref.conv(npref.batchnorm(x, *bn), w, b, strides=(2,) * dims, groups=groups)
    got = npref.conv(x, w2, b2, strides=(2,) * dims, groups=groups)
    np.testing.assert_allclose(got, expect, rtol=1e-10, atol=1e-10)


def test_fold_cast_keeps_the_bias_dtype(rng):
    w = rand(rng, 4, 2, 1, 1)
    b = rand(rng, 4).astype(np.float16)
    _, s, t = scale_shift(rng, 2)
    w_out, b_out = FORWARD.fold_cast(w, b, s, t, FoldAttrs())
    assert w_out.dtype == np.float32 and b_out.dtype == np.float16
    w2, b2 = FORWARD.fold(w, b, s, t, FoldAttrs())
    np.testing.assert_array_equal(w_out, w2.astype(np.float32))
    np.testing.assert_array_equal(b_out, b2.astype(np.float16))


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER"])
@pytest.mark.parametrize("kernel_attr", [False, True])
def test_same_padding_of_a_1x1_stride_1_conv_pads_nothing(rng, auto_pad, kernel_attr):
    """SAME_* pads (ceil(in/stride) - 1) * stride + (k - 1) * dilation + 1 - in per axis: 0 for a
    1x1 kernel at stride 1 whatever the input, so the forward fold is exact (it was refused as
    padded, review 25m). With stride 2 it can pad: still refused."""
    extra = {"kernel_shape": [1, 1]} if kernel_attr else {}
    node, g = _conv(rand(rng, 4, 2, 1, 1), auto_pad=auto_pad, **extra)
    assert FORWARD.match(node, g, 2) == Match(2, 4)
    node, g = _conv(rand(rng, 4, 2, 1, 1), auto_pad=auto_pad, strides=[2, 2], **extra)
    assert refusal(FORWARD.match, node, g, 2)[0] is Reason.PADDED_FORWARD_FOLD
    tall = {"kernel_shape": [3, 1]} if kernel_attr else {}
    node, g = _conv(rand(rng, 4, 2, 3, 1), auto_pad=auto_pad, **tall)  # a 3x1 kernel pads the first axis
    assert refusal(FORWARD.match, node, g, 2)[0] is Reason.PADDED_FORWARD_FOLD


def test_bn_before_a_same_padded_1x1_conv_folds_forward_and_verifies(rng):
    """End to end: graph input -> BN -> Conv(1x1, SAME_UPPER): folded into the Conv, and onnxruntime
    gives the original's outputs on odd and even spatial sizes."""
    from conftest import init as mk_init
    from conftest import make_model, ort_run

    import bnfold

    c = 3
    nodes = [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["n"], name="bn"),
             helper.make_node("Conv", ["n", "w", "cb"], ["y"], name="conv", auto_pad="SAME_UPPER")]
    f32 = np.float32
    inits = [mk_init("s", rng.uniform(0.5, 2, c).astype(f32)), mk_init("b", rng.normal(size=c).astype(f32)),
             mk_init("m", rng.normal(size=c).astype(f32)), mk_init("v", rng.uniform(0.5, 2, c).astype(f32)),
             mk_init("w", rng.normal(size=(5, c, 1, 1)).astype(f32)), mk_init("cb", rng.normal(size=5).astype(f32))]
    model = make_model(nodes, [vi("x", ["N", c, "H", "W"])], [vi("y", ["N", 5, "H", "W"])], inits)
    result = bnfold.fold(model)
    (record,) = result.report.bns
    assert record.action.value == "folded" and record.direction == "forward", record
    for hw in ((5, 7), (4, 4)):
        x = rng.normal(size=(2, c, *hw)).astype(np.float32)
        np.testing.assert_allclose(ort_run(result.model, {"x": x})[0], ort_run(model, {"x": x})[0],
                                   rtol=1e-5, atol=1e-5)
