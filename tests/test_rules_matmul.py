"""rules.MATMUL: x @ W with a constant (K, N) W and a rank-2 x; the bias becomes an Add."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import init, rand, vi
from onnx import helper
from rulecase import refusal, scale_shift, view

from bnfold.records import Reason
from bnfold.rules import MATMUL, FoldAttrs, Match


def _matmul(w, *, a_rank=2, w_const=True, a_const=False, a_shape=None):
    node = helper.make_node("MatMul", ["a", "w"], ["y"], name="m")
    inits = ([init("w", w)] if w_const else []) + ([init("a", rand(np.random.default_rng(0), 3, 4))] if a_const else [])
    inputs = ([] if a_const else [vi("a", a_rank if a_shape is None else a_shape)])
    inputs += [] if w_const else [vi("w", list(w.shape))]
    return node, view(node, inputs, [vi("y", 2)], inits)


def test_match_accepts_a_rank_2_input(rng):
    node, g = _matmul(rand(rng, 4, 6))
    assert MATMUL.match(node, list(node.input), g) == Match(6, 2)
    assert MATMUL.bias_slot is None


def test_refuses_the_constant_on_the_left(rng):
    node, g = _matmul(rand(rng, 4, 6), w_const=False, a_const=True)
    assert refusal(MATMUL.match, node, list(node.input), g) == (
        Reason.UNSUPPORTED_PRODUCER, "MatMul 'm' has its constant on the left")


def test_refuses_a_computed_or_integer_weight(rng):
    node, g = _matmul(rand(rng, 4, 6), w_const=False)
    assert refusal(MATMUL.match, node, list(node.input), g) == (
        Reason.NOT_CONSTANT, "weight of MatMul 'm' is not a constant")
    node, g = _matmul(np.ones((4, 6), np.int32))
    assert refusal(MATMUL.match, node, list(node.input), g)[0] is Reason.UNSUPPORTED_DTYPE


def test_refuses_a_weight_of_rank_3(rng):
    node, g = _matmul(rand(rng, 2, 4, 6))
    assert refusal(MATMUL.match, node, list(node.input), g) == (
        Reason.CHANNEL_MISMATCH, "MatMul 'm' weight has rank 3, not 2")


@pytest.mark.parametrize("a_shape,reason,detail", [
    (None, Reason.UNKNOWN_RANK, "rank of MatMul 'm' input is unknown"),
    (3, Reason.CHANNEL_MISMATCH, "MatMul 'm' output has rank 3: its columns are not on BN axis 1")])
def test_refuses_an_input_that_is_not_rank_2(rng, a_shape, reason, detail):
    node = helper.make_node("MatMul", ["a", "w"], ["y"], name="m")
    a = vi("a", a_shape) if a_shape is not None else vi("a", None)
    g = view(node, [a], [vi("y", None)], [init("w", rand(rng, 4, 6))])
    assert refusal(MATMUL.match, node, list(node.input), g) == (reason, detail)


@pytest.mark.parametrize("bias_shape", [None, (), (6,), (1, 6)])
def test_folded_tensors_compute_matmul_then_bn(rng, bias_shape):
    w = rng.standard_normal((4, 6))
    bias = None if bias_shape is None else rng.standard_normal(bias_shape)
    x = rng.standard_normal((3, 4))
    (gamma, beta, mean, var, eps), s, t = scale_shift(rng, 6)
    w2, b2 = MATMUL.fold(w, bias, s, t, FoldAttrs())
    y = x @ w + (0.0 if bias is None else bias)
    expect = gamma * (y - mean) / np.sqrt(var + eps) + beta
    np.testing.assert_allclose(x @ w2 + b2, expect, rtol=1e-10, atol=1e-10)
    assert b2.shape == (6,)
