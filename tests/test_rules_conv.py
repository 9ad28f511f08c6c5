"""rules.CONV: which Conv nodes can take a backward fold, why not, and the folded tensors."""
from __future__ import annotations

import npref
import numpy as np
import pytest
from conftest import DOUBLE, FLOAT, init, rand, vi
from onnx import helper
from rulecase import refusal, scale_shift, view

from bnfold.formulas import arith
from bnfold.records import Reason
from bnfold.rules import CONV, RULES, FoldAttrs, Match
from bnfold.stages.plan import PRODUCERS


def _conv(w, b=None, *, w_const=True, b_const=True, group=1, elem=FLOAT):
    ins = ["x", "w"] + (["b"] if b is not None else [])
    node = helper.make_node("Conv", ins, ["y"], name="c", group=group)
    inits = [init("w", w)] if w_const else []
    inputs = [vi("x", w.ndim, elem)] + ([] if w_const else [vi("w", list(w.shape), elem)])
    if b is not None:
        if b_const:
            inits.append(init("b", b))
        else:
            inputs.append(vi("b", [w.shape[0]], elem))
    return node, view(node, inputs, [vi("y", w.ndim, elem)], inits)


def test_registry_names_every_producer_once():
    assert set(RULES) == {"Conv", "ConvTranspose", "Gemm", "MatMul"} == PRODUCERS
    assert RULES["Conv"] is CONV and all(op == r.op_type for op, r in RULES.items())


@pytest.mark.parametrize("shape,group", [((5, 3, 3), 1), ((6, 2, 3, 3), 2), ((4, 1, 1, 2, 2), 4)])
def test_match_gives_output_channels_and_rank(rng, shape, group):
    node, g = _conv(rand(rng, *shape), rand(rng, shape[0]), group=group)
    assert CONV.match(node, list(node.input), g) == Match(shape[0], len(shape))


def test_refuses_a_computed_weight(rng):
    node, g = _conv(rand(rng, 4, 3, 3, 3), w_const=False)
    assert refusal(CONV.match, node, list(node.input), g) == (
        Reason.NOT_CONSTANT, "weight of Conv 'c' is not a constant")


def test_refuses_a_computed_bias(rng):
    node, g = _conv(rand(rng, 4, 3, 3, 3), rand(rng, 4), b_const=False)
    assert refusal(CONV.match, node, list(node.input), g) == (Reason.NOT_CONSTANT, "bias of Conv 'c' is not a constant")


def test_refuses_an_integer_weight(rng):
    node, g = _conv(np.ones((4, 3, 3, 3), np.int64))
    assert refusal(CONV.match, node, list(node.input), g) == (
        Reason.UNSUPPORTED_DTYPE, "weight of Conv 'c' is not floating point")


@pytest.mark.parametrize("dims,groups,c_in,c_out,bias", [(1, 1, 3, 5, True), (2, 2, 4, 6, False), (3, 1, 2, 3, True)])
def test_folded_tensors_compute_conv_then_bn(rng, dims, groups, c_in, c_out, bias):
    w = rng.standard_normal((c_out, c_in // groups) + (3,) * dims)
    b = rng.standard_normal(c_out) if bias else None
    bn, s, t = scale_shift(rng, c_out)
    x = rng.standard_normal((2, c_in) + (5,) * dims)
    w2, b2 = CONV.fold(w, b, s, t, FoldAttrs(group=groups))
    assert w2.dtype == b2.dtype == np.float64 and w2.shape == w.shape
    expect = npref.batchnorm(npref.conv(x, w, b, groups=groups), *bn)
    np.testing.assert_allclose(npref.conv(x, w2, b2, groups=groups), expect, rtol=1e-10, atol=1e-10)


def test_fold_cast_keeps_dtypes_and_refuses_overflow(rng):
    w = rand(rng, 3, 2, 1, 1).astype(np.float16)
    b = rand(rng, 3).astype(np.float16)
    _, s, t = scale_shift(rng, 3)
    w_out, b_out = CONV.fold_cast(w, b, s, t, FoldAttrs())
    assert w_out.dtype == b_out.dtype == np.float16
    np.testing.assert_array_equal(w_out, (w.astype(np.float64) * s[:, None, None, None]).astype(np.float16))
    np.testing.assert_array_equal(b_out, (s * b.astype(np.float64) + t).astype(np.float16))
    with pytest.raises(arith.FoldValueError) as err:
        CONV.fold_cast(np.full((3, 2, 1, 1), 100.0, np.float16), None, np.array([1e4, 1.0, 1.0]), t, FoldAttrs())
    assert err.value.kind == "overflow"


def test_out_channels_ignores_groups():
    assert CONV.out_channels((8, 2, 3, 3), FoldAttrs(group=4)) == 8


def test_double_weight_is_accepted(rng):
    node, g = _conv(rng.standard_normal((2, 2, 1, 1)), elem=DOUBLE)
    assert CONV.match(node, list(node.input), g).out_channels == 2
