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
