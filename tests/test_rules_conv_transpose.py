"""rules.CONV_TRANSPOSE: output channels g*(C_out/groups)+j live on axis 1 of each group's slice."""
from __future__ import annotations

import npref
import numpy as np
import pytest
from conftest import FLOAT, init, rand, vi
from onnx import helper
from rulecase import refusal, scale_shift, view

from bnfold.records import Reason
from bnfold.rules import CONV_TRANSPOSE, FoldAttrs, Match


def _convt(w, b=None, *, group=1, w_const=True, b_const=True):
    ins = ["x", "w"] + (["b"] if b is not None else [])
    node = helper.make_node("ConvTranspose", ins, ["y"], name="ct", group=group)
    inits = [init("w", w)] if w_const else []
    inputs = [vi("x", w.ndim, FLOAT)] + ([] if w_const else [vi("w", list(w.shape))])
    if b is not None:
        if b_const:
            inits.append(init("b", b))
        else:
            inputs.append(vi("b", [len(b)]))
    return node, view(node, inputs, [vi("y", w.ndim)], inits)


@pytest.mark.parametrize("shape,group,c_out", [((3, 5, 2, 2), 1, 5), ((4, 3, 2, 2), 2, 6), ((4, 1, 3), 4, 4)])
def test_match_counts_output_channels_over_groups(rng, shape, group, c_out):
    node, g = _convt(rand(rng, *shape), rand(rng, c_out), group=group)
    assert CONV_TRANSPOSE.attrs(node) == FoldAttrs(group=group)
    assert CONV_TRANSPOSE.match(node, list(node.input), g) == Match(c_out, len(shape))


def test_refusals(rng):
    node, g = _convt(rand(rng, 3, 5, 2, 2), w_const=False)
    assert refusal(CONV_TRANSPOSE.match, node, list(node.input), g) == (
        Reason.NOT_CONSTANT, "weight of ConvTranspose 'ct' is not a constant")
    node, g = _convt(rand(rng, 3, 5, 2, 2), rand(rng, 5), b_const=False)
    assert refusal(CONV_TRANSPOSE.match, node, list(node.input), g) == (
        Reason.NOT_CONSTANT, "bias of ConvTranspose 'ct' is not a constant")
    node, g = _convt(np.ones((3, 5, 2, 2), np.int32))
    assert refusal(CONV_TRANSPOSE.match, node, list(node.input), g)[0] is Reason.UNSUPPORTED_DTYPE


@pytest.mark.parametrize("dims,groups,c_in,cout_g,bias", [(1, 1, 3, 4, True), (2, 2, 4, 3, False),
                                                           (2, 3, 6, 2, True), (3, 2, 2, 1, True)])
def test_folded_tensors_compute_conv_transpose_then_bn(rng, dims, groups, c_in, cout_g, bias):
    w = rng.standard_normal((c_in, cout_g) + (2,) * dims)
    c_out = cout_g * groups
    b = rng.standard_normal(c_out) if bias else None
    bn, s, t = scale_shift(rng, c_out)
    x = rng.standard_normal((2, c_in) + (3,) * dims)
    w2, b2 = CONV_TRANSPOSE.fold(w, b, s, t, FoldAttrs(group=groups))
    expect = npref.batchnorm(npref.conv_transpose(x, w, b, strides=(2,) * dims, groups=groups), *bn)
    got = npref.conv_transpose(x, w2, b2, strides=(2,) * dims, groups=groups)
    np.testing.assert_allclose(got, expect, rtol=1e-10, atol=1e-10)


def test_fold_cast_casts_to_the_weight_dtype(rng):
    w = rand(rng, 4, 3, 2, 2)
    _, s, t = scale_shift(rng, 6)
    w_out, b_out = CONV_TRANSPOSE.fold_cast(w, None, s, t, FoldAttrs(group=2))
    w2, _ = CONV_TRANSPOSE.fold(w, None, s, t, FoldAttrs(group=2))
    assert w_out.dtype == b_out.dtype == np.float32
    np.testing.assert_array_equal(w_out, w2.astype(np.float32))
    np.testing.assert_array_equal(b_out, t.astype(np.float32))
