"""rules.GEMM: Y = alpha*A@op(B) + beta*C (and a torch Linear, transB=1, alpha = beta = 1)."""
from __future__ import annotations

import npref
import numpy as np
import pytest
from conftest import init, rand, vi
from onnx import helper
from rulecase import refusal, scale_shift, view

from bnfold.graph.attrs import get_attr
from bnfold.records import Reason
from bnfold.rules import GEMM, FoldAttrs, Match


def _gemm(b, c=None, *, b_const=True, c_const=True, **attrs):
    ins = ["a", "B"] + (["C"] if c is not None else [])
    node = helper.make_node("Gemm", ins, ["y"], name="g", **attrs)
    inits = [init("B", b)] if b_const else []
    inputs = [vi("a", 2)] + ([] if b_const else [vi("B", list(b.shape))])
    if c is not None:
        if c_const:
            inits.append(init("C", c))
        else:
            inputs.append(vi("C", list(np.shape(c))))
    return node, view(node, inputs, [vi("y", 2)], inits)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (), (1,), (6,), (1, 6), (1, 1)])
def test_match_accepts_per_column_c(rng, trans_b, c_shape):
    b = rand(rng, *((6, 4) if trans_b else (4, 6)))
    c = None if c_shape is None else rand(rng, *c_shape)
    node, g = _gemm(b, c, transB=trans_b)
    assert GEMM.match(node, list(node.input), g) == Match(6, 2)


@pytest.mark.parametrize("c_shape", [(3, 6), (3, 1), (2,)])
def test_refuses_c_that_is_not_per_column(rng, c_shape):
    node, g = _gemm(rand(rng, 4, 6), rand(rng, *c_shape))
    assert refusal(GEMM.match, node, list(node.input), g) == (
        Reason.CHANNEL_MISMATCH, f"Gemm 'g' C of shape {list(c_shape)} is not per column")


def test_refuses_computed_or_integer_parameters(rng):
    node, g = _gemm(rand(rng, 4, 6), b_const=False)
    assert refusal(GEMM.match, node, list(node.input), g) == (Reason.NOT_CONSTANT, "B of Gemm 'g' is not a constant")
    node, g = _gemm(rand(rng, 4, 6), rand(rng, 6), c_const=False)
    assert refusal(GEMM.match, node, list(node.input), g) == (Reason.NOT_CONSTANT, "C of Gemm 'g' is not a constant")
    node, g = _gemm(np.ones((4, 6), np.int64))
    assert refusal(GEMM.match, node, list(node.input), g)[0] is Reason.UNSUPPORTED_DTYPE


@pytest.mark.parametrize("trans_a,trans_b,alpha,beta,c_shape", [
    (0, 0, 1.0, 1.0, None), (0, 1, 0.5, 2.0, (5,)), (1, 0, 1.5, -0.5, (1, 5)), (1, 1, 2.0, 0.25, ())])
def test_folded_tensors_compute_gemm_then_bn(rng, trans_a, trans_b, alpha, beta, c_shape):
    a = rng.standard_normal((3, 4) if trans_a else (4, 3))
    bm = rng.standard_normal((5, 3) if trans_b else (3, 5))
    c = None if c_shape is None else rng.standard_normal(c_shape)
    bn, s, t = scale_shift(rng, 5)
    node = helper.make_node("Gemm", ["a", "B"], ["y"], transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)
    attrs = GEMM.attrs(node)
    assert attrs == FoldAttrs(trans_b=bool(trans_b), alpha=alpha, beta=beta)
    b2, c2 = GEMM.fold(bm, c, s, t, attrs)
    expect = npref.batchnorm(npref.gemm(a, bm, c, alpha=alpha, beta=beta, trans_a=trans_a, trans_b=trans_b), *bn)
    got = npref.gemm(a, b2, c2, alpha=alpha, beta=1.0, trans_a=trans_a, trans_b=trans_b)
    np.testing.assert_allclose(got, expect, rtol=1e-10, atol=1e-10)
    GEMM.finish(node)
    assert get_attr(node, "beta") == 1.0 and get_attr(node, "alpha") == pytest.approx(alpha)


def test_linear_is_gemm_with_trans_b(rng):
    w = rng.standard_normal((6, 4))  # torch Linear: (out, in), y = x @ W.T + b
    b = rng.standard_normal(6)
    x = rng.standard_normal((3, 4))
    bn, s, t = scale_shift(rng, 6)
    attrs = FoldAttrs(trans_b=True)
    assert GEMM.out_channels(w.shape, attrs) == 6 and GEMM.out_channels(w.shape, FoldAttrs()) == 4
    w2, b2 = GEMM.fold(w, b, s, t, attrs)
    np.testing.assert_allclose(x @ w2.T + b2, npref.batchnorm(x @ w.T + b, *bn), rtol=1e-10, atol=1e-10)


def test_bias_slot_is_c():
    assert GEMM.bias_slot == 2
