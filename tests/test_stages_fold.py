"""Folding end to end through the public API, on real ONNX graphs run in onnxruntime.

Each test builds a tiny model with an inference BN, folds it with ``fold`` and checks that
no BatchNormalization is left, the result passes the full ONNX checker, the report names the
right target and direction, ``inspect`` agrees, and the folded model computes what the
unfolded model computes (onnxruntime, optimisations off) and what numpy float64 computes.
"""
from __future__ import annotations

import npref
import numpy as np
import onnx
import pytest
from conftest import (
    DOUBLE,
    EPS,
    FLOAT,
    FLOAT16,
    assert_same_outputs,
    bn,
    bn_params,
    check_full,
    count_op,
    init,
    make_model,
    op_types,
    ort_run,
    rand,
    record,
    vi,
)
from onnx import helper

from bnfold.api import fold, inspect
from bnfold.records import Action


def fold_ok(model, feeds, *, bn_name="bn", target, direction="backward", rtol=1e-5, atol=1e-5, verify=True):
    """Fold, then check everything a successful fold promises; returns the FoldResult."""
    res = fold(model, verify=verify)
    rec = record(res, bn_name)
    assert rec.action is Action.FOLDED, (rec.reason, rec.detail)
    assert rec.target == target
    assert rec.direction == direction
    assert count_op(res.model, "BatchNormalization") == 0
    check_full(res.model)
    assert_same_outputs(model, res.model, feeds, rtol=rtol, atol=atol)
    if res.report.verification is not None:
        assert res.report.verification.passed
    insp = {i.name: i.decision for i in inspect(model)}
    assert insp[bn_name].action is Action.FOLDED
    assert insp[bn_name].target == target and insp[bn_name].direction == direction
    return res


def _close64(actual, expected, rtol=1e-4, atol=1e-4):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


# ---- Conv 1d / 2d / 3d, groups, bias ------------------------------------------------------
CONV_CASES = [
    # dims, groups, c_in, c_out, bias
    (1, 1, 3, 5, True),
    (1, 2, 4, 6, False),
    (2, 1, 3, 4, False),
    (2, 1, 3, 4, True),
    (2, 2, 4, 6, True),
    (2, 4, 4, 4, False),  # depthwise
    (2, 4, 4, 8, True),  # depthwise, channel multiplier 2
    (3, 1, 2, 3, True),
    (3, 2, 4, 4, False),
]


@pytest.mark.parametrize("dims,groups,c_in,c_out,bias", CONV_CASES)
def test_conv_bn_folds(rng, dims, groups, c_in, c_out, bias):
    k = (3,) * dims
    spatial = (7, 6, 5)[:dims]
    w = rand(rng, c_out, c_in // groups, *k)
    b = rand(rng, c_out)
    p = bn_params(rng, c_out)
    conv_in = ["x", "w"] + (["b"] if bias else [])
    inits = [init("w", w)] + ([init("b", b)] if bias else [])
    bn_node, bn_inits = bn("bn", "z", "y", p)
    model = make_model(
        [helper.make_node("Conv", conv_in, ["z"], name="conv", group=groups, pads=[1] * (2 * dims),
                          strides=[2] + [1] * (dims - 1)), bn_node],
        [vi("x", ["N", c_in, *spatial])], [vi("y", dims + 2)], inits + bn_inits)
    x = rand(rng, 2, c_in, *spatial)
    res = fold_ok(model, {"x": x}, target="conv")
    assert op_types(res.model) == ["Conv"]
    expect = npref.batchnorm(npref.conv(x, w, b if bias else None, pads=[1] * (2 * dims),
                                        strides=[2] + [1] * (dims - 1), groups=groups),
                             p["scale"], p["bias"], p["mean"], p["var"], EPS)
    _close64(ort_run(res.model, {"x": x})[0], expect)


# ---- ConvTranspose --------------------------------------------------------------------------
CT_CASES = [
    # groups, c_in, c_out, bias
    (1, 3, 5, True),
    (2, 4, 6, False),  # C_out/groups = 3 != C_in/groups = 2: catches the (C_in, C_out/g) layout slip
    (2, 4, 6, True),
    (4, 4, 4, False),  # depthwise
    (4, 4, 8, True),  # depthwise, multiplier 2
]


@pytest.mark.parametrize("groups,c_in,c_out,bias", CT_CASES)
def test_conv_transpose_bn_folds(rng, groups, c_in, c_out, bias):
    w = rand(rng, c_in, c_out // groups, 3, 2)
    b = rand(rng, c_out)
    p = bn_params(rng, c_out)
    inputs = ["x", "w"] + (["b"] if bias else [])
    inits = [init("w", w)] + ([init("b", b)] if bias else [])
    bn_node, bn_inits = bn("bn", "z", "y", p)
    model = make_model(
        [helper.make_node("ConvTranspose", inputs, ["z"], name="deconv", group=groups, strides=[2, 1],
                          pads=[1, 0, 0, 0]), bn_node],
        [vi("x", ["N", c_in, 4, 5])], [vi("y", 4)], inits + bn_inits)
    x = rand(rng, 2, c_in, 4, 5)
    res = fold_ok(model, {"x": x}, target="deconv")
    assert op_types(res.model) == ["ConvTranspose"]
    expect = npref.batchnorm(npref.conv_transpose(x, w, b if bias else None, strides=[2, 1], pads=[1, 0, 0, 0],
                                                  groups=groups),
                             p["scale"], p["bias"], p["mean"], p["var"], EPS)
    _close64(ort_run(res.model, {"x": x})[0], expect)


# ---- Gemm -----------------------------------------------------------------------------------
GEMM_CASES = [
    # transA, transB, alpha, beta, C shape (None = no C)
    (0, 0, 1.0, 1.0, None),
    (0, 1, 1.0, 1.0, "n"),
    (1, 0, 0.5, 2.0, "n"),
    (1, 1, 1.5, 0.25, "1n"),
    (0, 0, 2.0, 3.0, "1"),
    (0, 1, 0.7, 1.0, None),
]


@pytest.mark.parametrize("trans_a,trans_b,alpha,beta,c_shape", GEMM_CASES)
def test_gemm_bn_folds(rng, trans_a, trans_b, alpha, beta, c_shape):
    m_, k_, n_ = 5, 6, 4
    a_shape = (k_, m_) if trans_a else (m_, k_)
    bmat = rand(rng, *((n_, k_) if trans_b else (k_, n_)))
    c = {None: None, "n": rand(rng, n_), "1n": rand(rng, 1, n_), "1": rand(rng, 1)}[c_shape]
    p = bn_params(rng, n_)
    inputs = ["a", "B"] + (["C"] if c is not None else [])
    inits = [init("B", bmat)] + ([init("C", c)] if c is not None else [])
    bn_node, bn_inits = bn("bn", "z", "y", p)
    model = make_model(
        [helper.make_node("Gemm", inputs, ["z"], name="gemm", transA=trans_a, transB=trans_b, alpha=alpha,
                          beta=beta), bn_node],
        [vi("a", list(a_shape))], [vi("y", [m_, n_])], inits + bn_inits)
    a = rand(rng, *a_shape)
    res = fold_ok(model, {"a": a}, target="gemm")
    assert op_types(res.model) == ["Gemm"]
    expect = npref.batchnorm(npref.gemm(a, bmat, c, alpha=alpha, beta=beta, trans_a=bool(trans_a),
                                        trans_b=bool(trans_b)),
                             p["scale"], p["bias"], p["mean"], p["var"], EPS)
    _close64(ort_run(res.model, {"a": a})[0], expect)


# ---- MatMul with constant weight, with and without a following Add --------------------------
@pytest.mark.parametrize("with_add,bias_left", [(False, False), (True, False), (True, True)])
def test_matmul_bn_folds(rng, with_add, bias_left):
    k_, n_ = 6, 5
    w = rand(rng, k_, n_)
    bias = rand(rng, n_)
    p = bn_params(rng, n_)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm")]
    inits = [init("w", w)]
    z = "mm"
    if with_add:
        nodes.append(helper.make_node("Add", ["bias", "mm"] if bias_left else ["mm", "bias"], ["z"], name="add"))
        inits.append(init("bias", bias))
        z = "z"
    bn_node, bn_inits = bn("bn", z, "y", p)
    model = make_model(nodes + [bn_node], [vi("x", ["N", k_])], [vi("y", ["N", n_])], inits + bn_inits)
    x = rand(rng, 3, k_)
    res = fold_ok(model, {"x": x}, target="mm")
    assert count_op(res.model, "MatMul") == 1
    assert count_op(res.model, "Add") == 1  # at most one bias Add remains (the folded one)
    expect = npref.batchnorm(x.astype(np.float64) @ w + (bias if with_add else 0),
                             p["scale"], p["bias"], p["mean"], p["var"], EPS)
    _close64(ort_run(res.model, {"x": x})[0], expect)


# ---- forward: BN -> unpadded Conv -----------------------------------------------------------
@pytest.mark.parametrize("groups,c_in,c_out,bias", [(1, 3, 4, True), (1, 3, 4, False), (2, 4, 6, True),
                                                    (4, 4, 8, False)])
def test_bn_conv_forward_fold(rng, groups, c_in, c_out, bias):
    w = rand(rng, c_out, c_in // groups, 3, 3)
    b = rand(rng, c_out)
    p = bn_params(rng, c_in)
    bn_node, bn_inits = bn("bn", "x", "xn", p)
    inputs = ["xn", "w"] + (["b"] if bias else [])
    inits = [init("w", w)] + ([init("b", b)] if bias else [])
    model = make_model(
        [bn_node, helper.make_node("Conv", inputs, ["y"], name="conv", group=groups, strides=[2, 1])],
        [vi("x", ["N", c_in, 7, 6])], [vi("y", 4)], inits + bn_inits)
    x = rand(rng, 2, c_in, 7, 6)
    res = fold_ok(model, {"x": x}, target="conv", direction="forward")
    assert op_types(res.model) == ["Conv"]
    assert res.model.graph.node[0].input[0] == "x"
    expect = npref.conv(npref.batchnorm(x, p["scale"], p["bias"], p["mean"], p["var"], EPS), w,
                        b if bias else None, strides=[2, 1], groups=groups)
    _close64(ort_run(res.model, {"x": x})[0], expect)


def test_forward_fold_after_unsupported_producer(rng):
    """Relu -> BN -> unpadded Conv: backward impossible, forward fold into the Conv."""
    w = rand(rng, 4, 3, 1, 1)
    p = bn_params(rng, 3)
    bn_node, bn_inits = bn("bn", "r", "xn", p)
    model = make_model(
        [helper.make_node("Relu", ["x"], ["r"], name="relu"), bn_node,
         helper.make_node("Conv", ["xn", "w"], ["y"], name="conv")],
        [vi("x", ["N", 3, 5, 5])], [vi("y", 4)], [init("w", w)] + bn_inits)
    res = fold_ok(model, {"x": rand(rng, 2, 3, 5, 5)}, target="conv", direction="forward")
    assert op_types(res.model) == ["Relu", "Conv"]


# ---- look-through ---------------------------------------------------------------------------
def test_conv_transpose_add_bn_paddle_pattern(rng):
    """ConvTranspose -> Add(per-channel (1,C,1,1) constant) -> BN: folds, the Add disappears."""
    c_in, c_out, groups = 4, 6, 2
    w = rand(rng, c_in, c_out // groups, 2, 2)
    add_c = rand(rng, 1, c_out, 1, 1)
    p = bn_params(rng, c_out)
    bn_node, bn_inits = bn("bn", "z", "y", p)
    model = make_model(
        [helper.make_node("ConvTranspose", ["x", "w"], ["t"], name="deconv", group=groups, strides=[2, 2]),
         helper.make_node("Add", ["t", "addc"], ["z"], name="add"), bn_node],
        [vi("x", ["N", c_in, 3, 3])], [vi("y", 4)], [init("w", w), init("addc", add_c)] + bn_inits)
    x = rand(rng, 2, c_in, 3, 3)
    res = fold_ok(model, {"x": x}, target="deconv")
    assert op_types(res.model) == ["ConvTranspose"]
    assert "addc" not in {t.name for t in res.model.graph.initializer}
    expect = npref.batchnorm(npref.conv_transpose(x, w, strides=[2, 2], groups=groups) + add_c,
                             p["scale"], p["bias"], p["mean"], p["var"], EPS)
    _close64(ort_run(res.model, {"x": x})[0], expect)


def test_gemm_unsqueeze_bn2d(rng):
    bmat = rand(rng, 6, 4)
    c = rand(rng, 4)
    p = bn_params(rng, 4)
    bn_node, bn_inits = bn("bn", "u", "y", p)
    model = make_model(
        [helper.make_node("Gemm", ["a", "B", "C"], ["g"], name="gemm"),
         helper.make_node("Unsqueeze", ["g", "axes"], ["u"], name="unsq"), bn_node],
        [vi("a", [3, 6])], [vi("y", [3, 4, 1, 1])],
        [init("B", bmat), init("C", c), init("axes", np.array([2, 3], np.int64))] + bn_inits)
    a = rand(rng, 3, 6)
    res = fold_ok(model, {"a": a}, target="gemm")
    assert op_types(res.model) == ["Gemm", "Unsqueeze"]
    expect = npref.batchnorm((a.astype(np.float64) @ bmat + c)[:, :, None, None],
                             p["scale"], p["bias"], p["mean"], p["var"], EPS)
    _close64(ort_run(res.model, {"a": a})[0], expect)


def test_gemm_reshape_bn(rng):
    bmat = rand(rng, 4, 6)  # transB
    p = bn_params(rng, 4)
    bn_node, bn_inits = bn("bn", "r", "y", p)
    model = make_model(
        [helper.make_node("Gemm", ["a", "B"], ["g"], name="gemm", transB=1),
         helper.make_node("Reshape", ["g", "shape"], ["r"], name="reshape"), bn_node],
        [vi("a", ["N", 6])], [vi("y", 4)],
        [init("B", bmat), init("shape", np.array([0, 4, 1, 1], np.int64))] + bn_inits)
    a = rand(rng, 3, 6)
    res = fold_ok(model, {"a": a}, target="gemm")
    assert op_types(res.model) == ["Gemm", "Reshape"]
    expect = npref.batchnorm((a.astype(np.float64) @ bmat.T).reshape(3, 4, 1, 1),
                             p["scale"], p["bias"], p["mean"], p["var"], EPS)
    _close64(ort_run(res.model, {"a": a})[0], expect)


def test_conv_identity_bn(rng):
    w = rand(rng, 4, 3, 3, 3)
    p = bn_params(rng, 4)
    bn_node, bn_inits = bn("bn", "i", "y", p)
    model = make_model(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
         helper.make_node("Identity", ["c"], ["i"], name="ident"), bn_node],
        [vi("x", ["N", 3, 6, 6])], [vi("y", 4)], [init("w", w)] + bn_inits)
    res = fold_ok(model, {"x": rand(rng, 2, 3, 6, 6)}, target="conv")
    assert count_op(res.model, "Conv") == 1
    assert set(op_types(res.model)) <= {"Conv", "Identity"}


def _const(name, array):
    return helper.make_node("Constant", [], [name], name=f"const_{name}", value=init(name, array))


def test_weights_and_bn_params_in_constant_nodes(rng):
    """Paddle: weights, bias and BN parameters come from Constant nodes, not initializers."""
    w, b = rand(rng, 4, 3, 3, 3), rand(rng, 4)
    p = bn_params(rng, 4)
    nodes = [_const("w", w), _const("b", b)] + [_const(f"bn.{k}", v) for k, v in p.items()]
    nodes += [helper.make_node("Conv", ["x", "w", "b"], ["z"], name="conv", pads=[1, 1, 1, 1]),
              helper.make_node("BatchNormalization", ["z", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["y"],
                               name="bn", epsilon=EPS)]
    model = make_model(nodes, [vi("x", ["N", 3, 6, 6])], [vi("y", 4)])
    x = rand(rng, 2, 3, 6, 6)
    res = fold_ok(model, {"x": x}, target="conv")
    assert op_types(res.model) == ["Conv"], "Constant nodes that only fed the fold must be removed"
    expect = npref.batchnorm(npref.conv(x, w, b, pads=[1] * 4), p["scale"], p["bias"], p["mean"], p["var"], EPS)
    _close64(ort_run(res.model, {"x": x})[0], expect)


def test_weights_computed_by_cast_and_mul(rng):
    """W = Cast(Constant fp64 -> fp32) * scale; bias = Cast(initializer fp64)."""
    w64 = rng.standard_normal((4, 3, 3, 3))
    scale = np.float32(0.25)
    b64 = rng.standard_normal(4)
    p = bn_params(rng, 4)
    bn_node, bn_inits = bn("bn", "z", "y", p)
    nodes = [
        _const("w64", w64),
        helper.make_node("Cast", ["w64"], ["w32"], name="cast_w", to=FLOAT),
        helper.make_node("Mul", ["w32", "wscale"], ["w"], name="mul_w"),
        helper.make_node("Cast", ["b64"], ["b"], name="cast_b", to=FLOAT),
        helper.make_node("Conv", ["x", "w", "b"], ["z"], name="conv"),
        bn_node,
    ]
    model = make_model(nodes, [vi("x", ["N", 3, 5, 5])], [vi("y", 4)],
                       [init("wscale", np.array(scale)), init("b64", b64)] + bn_inits)
    x = rand(rng, 2, 3, 5, 5)
    res = fold_ok(model, {"x": x}, target="conv")
    assert op_types(res.model) == ["Conv"]
    w = (w64.astype(np.float32) * scale)
    expect = npref.batchnorm(npref.conv(x, w, b64.astype(np.float32)), p["scale"], p["bias"], p["mean"], p["var"], EPS)
    _close64(ort_run(res.model, {"x": x})[0], expect)


def test_bn_params_through_identity(rng):
    """torch eval export: BN parameters routed through Identity nodes."""
    w = rand(rng, 4, 3, 3, 3)
    p = bn_params(rng, 4)
    nodes = [helper.make_node("Identity", [f"p.{k}"], [f"bn.{k}"], name=f"id_{k}") for k in p]
    nodes += [helper.make_node("Conv", ["x", "w"], ["z"], name="conv"),
              helper.make_node("BatchNormalization", ["z", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["y"],
                               name="bn", epsilon=EPS)]
    model = make_model(nodes, [vi("x", ["N", 3, 5, 5])], [vi("y", 4)],
                       [init("w", w)] + [init(f"p.{k}", v) for k, v in p.items()])
    res = fold_ok(model, {"x": rand(rng, 2, 3, 5, 5)}, target="conv")
    assert op_types(res.model) == ["Conv"]
    assert not any(t.name.startswith("p.") for t in res.model.graph.initializer)


def test_constant_of_shape_weights(rng):
    """Weights built with ConstantOfShape (as in onnx's light_* models), then Mul by a tensor."""
    p = bn_params(rng, 4)
    bn_node, bn_inits = bn("bn", "z", "y", p)
    pattern = rand(rng, 4, 3, 3, 3)
    nodes = [
        helper.make_node("ConstantOfShape", ["wshape"], ["ones"], name="cos_w",
                         value=helper.make_tensor("v", FLOAT, [1], [0.5])),
        helper.make_node("Mul", ["ones", "pattern"], ["w"], name="mul_w"),
        helper.make_node("ConstantOfShape", ["bshape"], ["b"], name="cos_b",
                         value=helper.make_tensor("v", FLOAT, [1], [0.125])),
        helper.make_node("Conv", ["x", "w", "b"], ["z"], name="conv", pads=[1, 1, 1, 1]),
        bn_node,
    ]
    model = make_model(nodes, [vi("x", ["N", 3, 5, 5])], [vi("y", 4)],
                       [init("wshape", np.array([4, 3, 3, 3], np.int64)), init("bshape", np.array([4], np.int64)),
                        init("pattern", pattern)] + bn_inits)
    x = rand(rng, 2, 3, 5, 5)
    res = fold_ok(model, {"x": x}, target="conv")
    assert op_types(res.model) == ["Conv"]
    expect = npref.batchnorm(npref.conv(x, 0.5 * pattern, np.full(4, 0.125), pads=[1] * 4),
                             p["scale"], p["bias"], p["mean"], p["var"], EPS)
    _close64(ort_run(res.model, {"x": x})[0], expect)


# ---- whole small networks -------------------------------------------------------------------
def test_chain_of_blocks_all_fold(rng):
    """Conv->BN->Relu x3 plus a Gemm->BN1d head: every BN folds, the function is unchanged."""
    nodes, inits = [], []
    cur, c = "x", 3
    for i, c_out in enumerate((4, 6, 5)):
        w = rand(rng, c_out, c, 3, 3)
        inits.append(init(f"w{i}", w))
        nodes.append(helper.make_node("Conv", [cur, f"w{i}"], [f"c{i}"], name=f"conv{i}", pads=[1] * 4))
        bn_node, bn_inits = bn(f"bn{i}", f"c{i}", f"b{i}", bn_params(rng, c_out))
        nodes += [bn_node, helper.make_node("Relu", [f"b{i}"], [f"r{i}"], name=f"relu{i}")]
        inits += bn_inits
        cur, c = f"r{i}", c_out
    nodes.append(helper.make_node("GlobalAveragePool", [cur], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flat"))
    nodes.append(helper.make_node("Gemm", ["flat", "fcw", "fcb"], ["fc"], name="fc", transB=1))
    inits += [init("fcw", rand(rng, 7, c)), init("fcb", rand(rng, 7))]
    bn_node, bn_inits = bn("bnfc", "fc", "y", bn_params(rng, 7))
    nodes.append(bn_node)
    inits += bn_inits
    model = make_model(nodes, [vi("x", ["N", 3, 8, 8])], [vi("y", 2)], inits)
    res = fold(model)
    assert res.report.folded == 4 and res.report.kept == 0
    assert {r.name: r.target for r in res.report.bns} == {"bn0": "conv0", "bn1": "conv1", "bn2": "conv2",
                                                         "bnfc": "fc"}
    assert count_op(res.model, "BatchNormalization") == 0
    check_full(res.model)
    assert res.report.verification is not None and res.report.verification.passed
    assert_same_outputs(model, res.model, {"x": rand(rng, 2, 3, 8, 8)}, rtol=1e-4, atol=1e-4)


def test_float64_model_folds_exactly(rng):
    """A float64 Gemm (onnxruntime has no float64 Conv on CPU): the fold keeps float64 and is exact."""
    bmat = rng.standard_normal((6, 4))
    c = rng.standard_normal(4)
    p = {k: v.astype(np.float64) for k, v in bn_params(rng, 4).items()}
    bn_node, bn_inits = bn("bn", "z", "y", p)
    model = make_model([helper.make_node("Gemm", ["a", "B", "C"], ["z"], name="gemm", beta=0.5), bn_node],
                       [vi("a", [3, 6], DOUBLE)], [vi("y", [3, 4], DOUBLE)],
                       [init("B", bmat), init("C", c)] + bn_inits)
    a = rng.standard_normal((3, 6))
    res = fold_ok(model, {"a": a}, target="gemm", rtol=1e-12, atol=1e-12)
    assert all(t.data_type == DOUBLE for t in res.model.graph.initializer)
    expect = npref.batchnorm(a @ bmat + 0.5 * c, p["scale"], p["bias"], p["mean"], p["var"], EPS)
    np.testing.assert_allclose(ort_run(res.model, {"a": a})[0], expect, rtol=1e-12, atol=1e-12)


def test_dry_run_changes_nothing_and_reports_the_fold(rng, tmp_path):
    w = rand(rng, 4, 3, 3, 3)
    bn_node, bn_inits = bn("bn", "z", "y", bn_params(rng, 4))
    model = make_model([helper.make_node("Conv", ["x", "w"], ["z"], name="conv"), bn_node],
                       [vi("x", ["N", 3, 5, 5])], [vi("y", 4)], [init("w", w)] + bn_inits)
    before = model.SerializeToString()
    out = tmp_path / "out.onnx"
    res = fold(model, output=out, dry_run=True)
    assert res.model is None
    assert record(res, "bn").action is Action.FOLDED and record(res, "bn").target == "conv"
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
    assert model.SerializeToString() == before


def test_caller_model_proto_not_mutated(rng):
    w = rand(rng, 4, 3, 3, 3)
    bn_node, bn_inits = bn("bn", "z", "y", bn_params(rng, 4))
    model = make_model([helper.make_node("Conv", ["x", "w"], ["z"]), bn_node],
                       [vi("x", ["N", 3, 5, 5])], [vi("y", 4)], [init("w", w)] + bn_inits)
    before = model.SerializeToString()
    res = fold(model)
    assert res.report.folded == 1
    assert model.SerializeToString() == before


def test_light_resnet50_from_onnx_wheel():
    """A real exported network (onnx's light_resnet50: ConstantOfShape-built weights, opset 9 era)."""
    import os

    path = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light", "light_resnet50.onnx")
    if not os.path.exists(path):
        pytest.skip("onnx wheel without light models")
    model = onnx.load(path)
    n_bn = count_op(model, "BatchNormalization")
    assert n_bn > 0
    res = fold(path)
    assert res.report.folded == n_bn, [(b.name, b.reason, b.detail) for b in res.report.bns if b.reason]
    assert count_op(res.model, "BatchNormalization") == 0
    assert res.report.verification is not None and res.report.verification.passed


# ---- more look-through shapes ---------------------------------------------------------------
def test_gemm_add_bias_bn(rng):
    bmat, bias = rand(rng, 6, 4), rand(rng, 4)
    p = bn_params(rng, 4)
    bn_node, bn_inits = bn("bn", "s", "y", p)
    model = make_model([helper.make_node("Gemm", ["a", "B"], ["g"], name="gemm"),
                        helper.make_node("Add", ["g", "bias"], ["s"], name="add"), bn_node],
                       [vi("a", ["N", 6])], [vi("y", 2)], [init("B", bmat), init("bias", bias)] + bn_inits)
    a = rand(rng, 3, 6)
    res = fold_ok(model, {"a": a}, target="gemm")
    assert op_types(res.model) == ["Gemm"]
    _close64(ort_run(res.model, {"a": a})[0],
             npref.batchnorm(a.astype(np.float64) @ bmat + bias, p["scale"], p["bias"], p["mean"], p["var"], EPS))


def test_conv_add_identity_bn(rng):
    w, add_c = rand(rng, 4, 3, 3, 3), rand(rng, 4, 1, 1)
    p = bn_params(rng, 4)
    bn_node, bn_inits = bn("bn", "i", "y", p)
    model = make_model([helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
                        helper.make_node("Add", ["addc", "c"], ["a"], name="add"),
                        helper.make_node("Identity", ["a"], ["i"], name="ident"), bn_node],
                       [vi("x", ["N", 3, 5, 5])], [vi("y", 4)], [init("w", w), init("addc", add_c)] + bn_inits)
    x = rand(rng, 2, 3, 5, 5)
    res = fold_ok(model, {"x": x}, target="conv")
    assert count_op(res.model, "Add") == 0
    _close64(ort_run(res.model, {"x": x})[0],
             npref.batchnorm(npref.conv(x, w) + add_c, p["scale"], p["bias"], p["mean"], p["var"], EPS))


def test_conv_reshape_to_bn1d(rng):
    """Conv (N, C, H, W) -> Reshape([0, C, -1]) -> BN1d on (N, C, H*W)."""
    w = rand(rng, 4, 3, 3, 3)
    p = bn_params(rng, 4)
    bn_node, bn_inits = bn("bn", "r", "y", p)
    model = make_model([helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
                        helper.make_node("Reshape", ["c", "shape"], ["r"], name="reshape"), bn_node],
                       [vi("x", ["N", 3, 5, 5])], [vi("y", 3)],
                       [init("w", w), init("shape", np.array([0, 4, -1], np.int64))] + bn_inits)
    res = fold_ok(model, {"x": rand(rng, 2, 3, 5, 5)}, target="conv")
    assert op_types(res.model) == ["Conv", "Reshape"]


def test_gemm_reshape_minus_one_batch(rng):
    """Gemm (N, C) -> Reshape([-1, C, 1, 1]) -> BN2d."""
    bmat = rand(rng, 6, 4)
    p = bn_params(rng, 4)
    bn_node, bn_inits = bn("bn", "r", "y", p)
    model = make_model([helper.make_node("Gemm", ["a", "B"], ["g"], name="gemm"),
                        helper.make_node("Reshape", ["g", "shape"], ["r"], name="reshape"), bn_node],
                       [vi("a", ["N", 6])], [vi("y", 4)],
                       [init("B", bmat), init("shape", np.array([-1, 4, 1, 1], np.int64))] + bn_inits)
    fold_ok(model, {"a": rand(rng, 3, 6)}, target="gemm")


def test_conv1d_squeeze_bn1d(rng):
    """Conv1d with output length 1 -> Squeeze(axes=[2]) -> BN1d on (N, C)."""
    w = rand(rng, 4, 3, 5)
    p = bn_params(rng, 4)
    bn_node, bn_inits = bn("bn", "s", "y", p)
    model = make_model([helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
                        helper.make_node("Squeeze", ["c", "axes"], ["s"], name="squeeze"), bn_node],
                       [vi("x", ["N", 3, 5])], [vi("y", 2)],
                       [init("w", w), init("axes", np.array([2], np.int64))] + bn_inits)
    x = rand(rng, 3, 3, 5)
    res = fold_ok(model, {"x": x}, target="conv")
    _close64(ort_run(res.model, {"x": x})[0],
             npref.batchnorm(npref.conv(x, w)[:, :, 0], p["scale"], p["bias"], p["mean"], p["var"], EPS))


def test_opset11_unsqueeze_axes_attribute(rng):
    bmat = rand(rng, 6, 4)
    p = bn_params(rng, 4)
    bn_node, bn_inits = bn("bn", "u", "y", p)
    model = make_model([helper.make_node("Gemm", ["a", "B"], ["g"], name="gemm"),
                        helper.make_node("Unsqueeze", ["g"], ["u"], name="unsq", axes=[-1, -2]), bn_node],
                       [vi("a", ["N", 6])], [vi("y", 4)], [init("B", bmat)] + bn_inits, opset=11)
    fold_ok(model, {"a": rand(rng, 3, 6)}, target="gemm")


# ---- dtypes and awkward statistics ----------------------------------------------------------
def test_fp16_conv_with_fp32_bn_parameters(rng):
    """Legal since opset 15: fp16 data, fp32 scale/bias/mean/var. The folded weight must stay fp16."""
    w = rand(rng, 4, 3, 3, 3, dtype=np.float16)
    p = bn_params(rng, 4, np.float32)
    bn_node, bn_inits = bn("bn", "z", "y", p)
    model = make_model([helper.make_node("Conv", ["x", "w"], ["z"], name="conv", pads=[1] * 4), bn_node],
                       [vi("x", ["N", 3, 5, 5], FLOAT16)], [vi("y", 4, FLOAT16)], [init("w", w)] + bn_inits)
    x = rand(rng, 2, 3, 5, 5, dtype=np.float16)
    res = fold_ok(model, {"x": x}, target="conv", rtol=2e-2, atol=2e-2)
    conv = res.model.graph.node[0]
    for name in conv.input[1:]:
        t = next(t for t in res.model.graph.initializer if t.name == name)
        assert t.data_type == FLOAT16, name


def test_fp16_folded_bias_may_be_subnormal_where_there_was_none(rng):
    """A Conv without bias gets b' = t; a t that is subnormal in fp16 is no loss (the old bias was 0)."""
    w = rand(rng, 2, 3, 1, 1, dtype=np.float16)
    p = {"scale": np.ones(2, np.float16), "bias": np.array([3e-5, 1.0], np.float16),
         "mean": np.zeros(2, np.float16), "var": np.ones(2, np.float16)}
    bn_node, bn_inits = bn("bn", "z", "y", p)
    model = make_model([helper.make_node("Conv", ["x", "w"], ["z"], name="conv"), bn_node],
                       [vi("x", ["N", 3, 4, 4], FLOAT16)], [vi("y", 4, FLOAT16)], [init("w", w)] + bn_inits)
    fold_ok(model, {"x": rand(rng, 2, 3, 4, 4, dtype=np.float16)}, target="conv", rtol=1e-2, atol=1e-2)


def test_pruned_channel_gamma_zero_and_denormal_or_zero_variance(rng):
    """Network-slimming zero gammas, denormal (5.6e-45) and zero running variances all fold."""
    w = rand(rng, 4, 3, 3, 3)
    p = bn_params(rng, 4)
    p["scale"][1] = 0.0
    p["var"][0] = np.float32(5.6e-45)
    p["var"][2] = 0.0
    bn_node, bn_inits = bn("bn", "z", "y", p)
    model = make_model([helper.make_node("Conv", ["x", "w"], ["z"], name="conv"), bn_node],
                       [vi("x", ["N", 3, 5, 5])], [vi("y", 4)], [init("w", w)] + bn_inits)
    x = rand(rng, 2, 3, 5, 5)
    res = fold_ok(model, {"x": x}, target="conv", rtol=1e-4, atol=1e-4)
    _close64(ort_run(res.model, {"x": x})[0],
             npref.batchnorm(npref.conv(x, w), p["scale"], p["bias"], p["mean"], p["var"], EPS), rtol=1e-4, atol=1e-3)


# ---- sharing and combinations ---------------------------------------------------------------
def test_bn_parameters_shared_by_two_bns(rng):
    p = bn_params(rng, 4)
    _, bn_inits = bn("bn", "z1", "y1", p)
    names = [t.name for t in bn_inits]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["z1"], name="conv1"),
             helper.make_node("Conv", ["x", "w2"], ["z2"], name="conv2"),
             helper.make_node("BatchNormalization", ["z1", *names], ["y1"], name="bn1"),
             helper.make_node("BatchNormalization", ["z2", *names], ["y2"], name="bn2")]
    model = make_model(nodes, [vi("x", ["N", 3, 5, 5])], [vi("y1", 4), vi("y2", 4)],
                       [init("w1", rand(rng, 4, 3, 3, 3)), init("w2", rand(rng, 4, 3, 3, 3))] + bn_inits)
    res = fold(model)
    assert res.report.folded == 2
    assert count_op(res.model, "BatchNormalization") == 0
    assert not any(t.name in names for t in res.model.graph.initializer)
    check_full(res.model)
    assert_same_outputs(model, res.model, {"x": rand(rng, 2, 3, 5, 5)})


def test_forward_fold_when_producer_weight_is_not_constant(rng):
    """Conv (weight fed at run time) -> BN -> unpadded Conv: backward impossible, forward fold."""
    bn_node, bn_inits = bn("bn", "z", "zn", bn_params(rng, 4))
    model = make_model([helper.make_node("Conv", ["x", "wdyn"], ["z"], name="conv1"), bn_node,
                        helper.make_node("Conv", ["zn", "w2", "b2"], ["y"], name="conv2")],
                       [vi("x", ["N", 3, 5, 5]), vi("wdyn", [4, 3, 1, 1])], [vi("y", 4)],
                       [init("w2", rand(rng, 2, 4, 3, 3)), init("b2", rand(rng, 2))] + bn_inits)
    feeds = {"x": rand(rng, 2, 3, 5, 5), "wdyn": rand(rng, 4, 3, 1, 1)}
    res = fold_ok(model, feeds, target="conv2", direction="forward", verify=False)
    assert "NOT_CONSTANT" in record(res, "bn").detail or "not a constant" in record(res, "bn").detail


def test_conv_bn_bn_conv_folds_both_ways(rng):
    """Conv -> BN1 -> BN2 -> unpadded Conv: BN1 backward into conv1, BN2 forward into conv2."""
    p1, p2 = bn_params(rng, 4), bn_params(rng, 4)
    bn1, i1 = bn("bn1", "z", "h", p1)
    bn2, i2 = bn("bn2", "h", "h2", p2)
    w1, w2 = rand(rng, 4, 3, 3, 3), rand(rng, 2, 4, 1, 1)
    model = make_model([helper.make_node("Conv", ["x", "w1"], ["z"], name="conv1", pads=[1] * 4), bn1, bn2,
                        helper.make_node("Conv", ["h2", "w2"], ["y"], name="conv2")],
                       [vi("x", ["N", 3, 5, 5])], [vi("y", 4)], [init("w1", w1), init("w2", w2)] + i1 + i2)
    x = rand(rng, 2, 3, 5, 5)
    res = fold(model)
    assert (record(res, "bn1").target, record(res, "bn1").direction) == ("conv1", "backward")
    assert (record(res, "bn2").target, record(res, "bn2").direction) == ("conv2", "forward")
    assert op_types(res.model) == ["Conv", "Conv"]
    check_full(res.model)
    assert res.report.verification.passed
    h = npref.batchnorm(npref.batchnorm(npref.conv(x, w1, pads=[1] * 4), p1["scale"], p1["bias"], p1["mean"],
                                        p1["var"], EPS), p2["scale"], p2["bias"], p2["mean"], p2["var"], EPS)
    _close64(ort_run(res.model, {"x": x})[0], npref.conv(h, w2))


def test_forward_fold_into_conv_with_shared_weight(rng):
    """BN -> conv1 (unpadded) and conv2 reading the same weight without a BN: conv2 keeps it."""
    w = rand(rng, 2, 3, 1, 1)
    bn_node, bn_inits = bn("bn", "x", "xn", bn_params(rng, 3))
    model = make_model([bn_node, helper.make_node("Conv", ["xn", "w"], ["y1"], name="conv1"),
                        helper.make_node("Conv", ["x2", "w"], ["y2"], name="conv2")],
                       [vi("x", ["N", 3, 4, 4]), vi("x2", ["N", 3, 4, 4])], [vi("y1", 4), vi("y2", 4)],
                       [init("w", w)] + bn_inits)
    res = fold_ok(model, {"x": rand(rng, 2, 3, 4, 4), "x2": rand(rng, 2, 3, 4, 4)}, target="conv1",
                  direction="forward")
    from bnfold.records import Reason
    assert record(res, "bn").reason is Reason.SHARED_WEIGHT_CLONED


def test_explicit_empty_bias_slot(rng):
    w = rand(rng, 4, 3, 3, 3)
    p = bn_params(rng, 4)
    bn_node, bn_inits = bn("bn", "z", "y", p)
    model = make_model([helper.make_node("Conv", ["x", "w", ""], ["z"], name="conv"), bn_node],
                       [vi("x", ["N", 3, 5, 5])], [vi("y", 4)], [init("w", w)] + bn_inits)
    x = rand(rng, 2, 3, 5, 5)
    res = fold_ok(model, {"x": x}, target="conv")
    _close64(ort_run(res.model, {"x": x})[0],
             npref.batchnorm(npref.conv(x, w), p["scale"], p["bias"], p["mean"], p["var"], EPS))


# ---- scale ----------------------------------------------------------------------------------
def _chain(rng, n, training=False):
    nodes, inits, cur = [], [], "x"
    for i in range(n):
        inits.append(init(f"w{i}", rand(rng, 2, 2, 1, 1, scale=0.7)))
        nodes.append(helper.make_node("Conv", [cur, f"w{i}"], [f"c{i}"], name=f"conv{i}"))
        bn_node, bn_inits = bn(f"bn{i}", f"c{i}", f"b{i}", bn_params(rng, 2))
        if training:
            bn_node.attribute.append(helper.make_attribute("training_mode", 1))
            bn_node.output.extend([f"rm{i}", f"rv{i}"])
        nodes += [bn_node, helper.make_node("Relu", [f"b{i}"], [f"r{i}"], name=f"relu{i}")]
        inits += bn_inits
        cur = f"r{i}"
    return make_model(nodes, [vi("x", ["N", 2, 2, 2])], [vi(cur, 4)], inits, check=False)


def test_2000_block_chain_folds_quickly(rng):
    """onnxoptimizer took more than 5 minutes on a 2000-block Conv->BN->ReLU chain."""
    import time

    model = _chain(rng, 2000)
    t0 = time.perf_counter()
    res = fold(model)
    elapsed = time.perf_counter() - t0
    assert res.report.folded == 2000
    assert count_op(res.model, "BatchNormalization") == 0 and len(res.model.graph.initializer) == 4000
    assert res.report.verification.passed
    assert elapsed < 30, f"{elapsed:.1f} s"


def test_300_block_training_chain_calibrates_and_folds(rng):
    import time

    model = _chain(rng, 300, training=True)
    x = rand(rng, 16, 2, 2, 2)
    t0 = time.perf_counter()
    res = fold(model, data={"x": x}, batch_size=4)
    assert time.perf_counter() - t0 < 30
    assert res.report.folded == 300
    assert all(r.stats is not None and r.stats.batches == 4 for r in res.report.bns)
    assert res.report.verification.passed


@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_backward_fold_into_the_same_conv(rng, bias):
    """Relu -> BN1 -> unpadded Conv -> BN2: BN1 folds forward and BN2 backward, both into the Conv.

    The two folds must compose (the second sees the first's weights), also now that backward
    folds into small Convs are computed in a batch before any fold is applied.
    """
    p1, p2 = bn_params(rng, 3), bn_params(rng, 4)
    bn1, i1 = bn("bn1", "r", "h", p1)
    bn2, i2 = bn("bn2", "z", "y", p2)
    w, b = rand(rng, 4, 3, 1, 1), rand(rng, 4)
    conv_in = ["h", "w"] + (["b"] if bias else [])
    model = make_model([helper.make_node("Relu", ["x"], ["r"], name="relu"), bn1,
                        helper.make_node("Conv", conv_in, ["z"], name="conv"), bn2],
                       [vi("x", ["N", 3, 5, 5])], [vi("y", 4)],
                       [init("w", w)] + ([init("b", b)] if bias else []) + i1 + i2)
    x = rand(rng, 2, 3, 5, 5)
    res = fold(model)
    assert (record(res, "bn1").target, record(res, "bn1").direction) == ("conv", "forward")
    assert (record(res, "bn2").target, record(res, "bn2").direction) == ("conv", "backward")
    assert op_types(res.model) == ["Relu", "Conv"]
    check_full(res.model)
    assert res.report.verification.passed
    h = npref.batchnorm(np.maximum(x, 0), p1["scale"], p1["bias"], p1["mean"], p1["var"], EPS)
    z = npref.conv(h, w, b if bias else None)
    _close64(ort_run(res.model, {"x": x})[0], npref.batchnorm(z, p2["scale"], p2["bias"], p2["mean"], p2["var"], EPS))
