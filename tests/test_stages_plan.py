"""Every reason code the planner and apply produce, each triggered by a minimal graph.

For each: the report's action and reason, ``inspect`` agreeing with ``fold``, the BN still present
where it was kept, the model valid (full checker) and computing the same function as before.
"""
from __future__ import annotations

import npref
import numpy as np
import pytest
from conftest import (
    EPS,
    FLOAT16,
    INT64,
    all_nodes,
    assert_same_outputs,
    bn,
    bn_params,
    check_full,
    count_op,
    init,
    make_model,
    ort_run,
    rand,
    record,
    vi,
)
from onnx import TensorProto, helper, numpy_helper

from bnfold.api import fold, inspect
from bnfold.records import Action, Reason


def outcome(model, feeds, bn_name="bn", *, verify=True, rtol=1e-5, atol=1e-5):
    """Fold and inspect; check validity and function; return (record, inspection decision, result)."""
    res = fold(model, verify=verify)
    rec = record(res, bn_name)
    insp = {i.name: i.decision for i in inspect(model)}[rec.name]
    assert (insp.action, insp.reason) == (rec.action, rec.reason), (insp, rec)
    assert insp.target == rec.target and insp.direction == rec.direction
    check_full(res.model)
    if feeds is not None:
        assert_same_outputs(model, res.model, feeds, rtol=rtol, atol=atol)
    if res.report.verification is not None:
        assert res.report.verification.passed
    return rec, insp, res


def assert_kept(model, feeds, reason, bn_name="bn", **kw):
    rec, _, res = outcome(model, feeds, bn_name, **kw)
    assert rec.action is Action.FROZEN_KEPT, (rec.reason, rec.detail)
    assert rec.reason is reason, (rec.reason, rec.detail)
    assert rec.target is None
    assert rec.detail, "a kept BN must say why"
    assert any(n.name == bn_name and n.op_type == "BatchNormalization" for n in all_nodes(res.model))
    return rec, res


def _conv(name, x, w, y, **attrs):
    return helper.make_node("Conv", [x, w], [y], name=name, **attrs)


# ---- NO_PRODUCER / PADDED_FORWARD_FOLD / BN_OUTPUT_FANOUT ------------------------------------
def test_no_producer_bn_on_graph_input(rng):
    bn_node, inits = bn("bn", "x", "y", bn_params(rng, 3))
    model = make_model([bn_node, helper.make_node("Relu", ["y"], ["r"], name="relu")],
                       [vi("x", ["N", 3, 4, 4])], [vi("r", 4)], inits)
    assert_kept(model, {"x": rand(rng, 2, 3, 4, 4)}, Reason.NO_PRODUCER)


def test_padded_forward_fold_on_graph_input(rng):
    """BN on a graph input, followed by a padded Conv: the forward candidate exists but pads."""
    bn_node, inits = bn("bn", "x", "xn", bn_params(rng, 3))
    model = make_model([bn_node, _conv("conv", "xn", "w", "y", pads=[1, 1, 1, 1])],
                       [vi("x", ["N", 3, 5, 5])], [vi("y", 4)], inits + [init("w", rand(rng, 4, 3, 3, 3))])
    rec, _ = assert_kept(model, {"x": rand(rng, 2, 3, 5, 5)}, Reason.PADDED_FORWARD_FOLD)


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER"])
def test_padded_forward_fold_auto_pad(rng, auto_pad):
    bn_node, inits = bn("bn", "x", "xn", bn_params(rng, 3))
    model = make_model([bn_node, _conv("conv", "xn", "w", "y", auto_pad=auto_pad)],
                       [vi("x", ["N", 3, 5, 5])], [vi("y", 4)], inits + [init("w", rand(rng, 4, 3, 2, 2))])
    assert_kept(model, {"x": rand(rng, 2, 3, 5, 5)}, Reason.PADDED_FORWARD_FOLD)


def test_bn_output_fanout_output_is_graph_output(rng):
    bn_node, inits = bn("bn", "x", "xn", bn_params(rng, 3))
    model = make_model([bn_node, _conv("conv", "xn", "w", "y")],
                       [vi("x", ["N", 3, 5, 5])], [vi("y", 4), vi("xn", 4)], inits + [init("w", rand(rng, 4, 3, 1, 1))])
    assert_kept(model, {"x": rand(rng, 2, 3, 5, 5)}, Reason.BN_OUTPUT_FANOUT)


def test_bn_output_fanout_two_readers(rng):
    bn_node, inits = bn("bn", "x", "xn", bn_params(rng, 3))
    model = make_model([bn_node, _conv("conv", "xn", "w", "y"), helper.make_node("Relu", ["xn"], ["r"], name="relu")],
                       [vi("x", ["N", 3, 5, 5])], [vi("y", 4), vi("r", 4)], inits + [init("w", rand(rng, 4, 3, 1, 1))])
    assert_kept(model, {"x": rand(rng, 2, 3, 5, 5)}, Reason.BN_OUTPUT_FANOUT)


def test_forward_conv_with_bn_output_as_weight_not_folded(rng):
    """BN output used as a Conv's *weight* (not its data input): never folded forward."""
    p = bn_params(rng, 3)
    bn_node, inits = bn("bn", "wraw", "wn", p)
    model = make_model([bn_node, _conv("conv", "x", "wn", "y")],
                       [vi("x", ["N", 3, 5, 5]), vi("wraw", [2, 3, 1, 1])], [vi("y", 4)], inits)
    rec, _ = assert_kept(model, {"x": rand(rng, 2, 3, 5, 5), "wraw": rand(rng, 2, 3, 1, 1)}, Reason.UNSUPPORTED_PRODUCER,
                         verify=False)


# ---- UNSUPPORTED_PRODUCER -------------------------------------------------------------------
def test_unsupported_producer_relu_bn_relu(rng):
    bn_node, inits = bn("bn", "r1", "b", bn_params(rng, 3))
    model = make_model([helper.make_node("Relu", ["x"], ["r1"], name="relu1"), bn_node,
                        helper.make_node("Relu", ["b"], ["y"], name="relu2")],
                       [vi("x", ["N", 3, 4, 4])], [vi("y", 4)], inits)
    assert_kept(model, {"x": rand(rng, 2, 3, 4, 4)}, Reason.UNSUPPORTED_PRODUCER)


def test_add_of_two_computed_tensors_is_not_looked_through(rng):
    """Residual: Conv + skip -> BN. The Add is not a per-channel constant bias."""
    bn_node, inits = bn("bn", "s", "y", bn_params(rng, 3))
    model = make_model([_conv("conv", "x", "w", "c", pads=[1, 1, 1, 1]),
                        helper.make_node("Add", ["c", "x"], ["s"], name="add"), bn_node],
                       [vi("x", ["N", 3, 4, 4])], [vi("y", 4)], inits + [init("w", rand(rng, 3, 3, 3, 3))])
    assert_kept(model, {"x": rand(rng, 2, 3, 4, 4)}, Reason.UNSUPPORTED_PRODUCER)


# ---- PRODUCER_FANOUT ------------------------------------------------------------------------
def test_producer_fanout_conv_output_is_graph_output(rng):
    bn_node, inits = bn("bn", "z", "y", bn_params(rng, 4))
    model = make_model([_conv("conv", "x", "w", "z"), bn_node],
                       [vi("x", ["N", 3, 5, 5])], [vi("y", 4), vi("z", 4)], inits + [init("w", rand(rng, 4, 3, 3, 3))])
    assert_kept(model, {"x": rand(rng, 2, 3, 5, 5)}, Reason.PRODUCER_FANOUT)


def test_producer_fanout_conv_output_read_twice(rng):
    bn_node, inits = bn("bn", "z", "y", bn_params(rng, 4))
    model = make_model([_conv("conv", "x", "w", "z"), bn_node, helper.make_node("Relu", ["z"], ["r"], name="relu")],
                       [vi("x", ["N", 3, 5, 5])], [vi("y", 4), vi("r", 4)], inits + [init("w", rand(rng, 4, 3, 3, 3))])
    assert_kept(model, {"x": rand(rng, 2, 3, 5, 5)}, Reason.PRODUCER_FANOUT)


def test_producer_fanout_inside_look_through_chain(rng):
    """Conv -> Add(bias) -> BN where the Add's output is also read elsewhere."""
    bn_node, inits = bn("bn", "a", "y", bn_params(rng, 4))
    model = make_model([_conv("conv", "x", "w", "z"), helper.make_node("Add", ["z", "bc"], ["a"], name="add"), bn_node,
                        helper.make_node("Relu", ["a"], ["r"], name="relu")],
                       [vi("x", ["N", 3, 5, 5])], [vi("y", 4), vi("r", 4)],
                       inits + [init("w", rand(rng, 4, 3, 3, 3)), init("bc", rand(rng, 1, 4, 1, 1))])
    assert_kept(model, {"x": rand(rng, 2, 3, 5, 5)}, Reason.PRODUCER_FANOUT)


# ---- NOT_CONSTANT ---------------------------------------------------------------------------
def test_not_constant_conv_weight_is_graph_input(rng):
    bn_node, inits = bn("bn", "z", "y", bn_params(rng, 4))
    model = make_model([_conv("conv", "x", "w", "z"), bn_node],
                       [vi("x", ["N", 3, 5, 5]), vi("w", [4, 3, 3, 3])], [vi("y", 4)], inits)
    feeds = {"x": rand(rng, 2, 3, 5, 5), "w": rand(rng, 4, 3, 3, 3)}
    assert_kept(model, feeds, Reason.NOT_CONSTANT)


def test_not_constant_bn_parameter_is_graph_input(rng):
    p = bn_params(rng, 4)
    nodes = [_conv("conv", "x", "w", "z"),
             helper.make_node("BatchNormalization", ["z", "gamma", "bn.bias", "bn.mean", "bn.var"], ["y"], name="bn")]
    model = make_model(nodes, [vi("x", ["N", 3, 5, 5]), vi("gamma", [4])], [vi("y", 4)],
                       [init("w", rand(rng, 4, 3, 3, 3)), init("bn.bias", p["bias"]), init("bn.mean", p["mean"]),
                        init("bn.var", p["var"])])
    feeds = {"x": rand(rng, 2, 3, 5, 5), "gamma": p["scale"]}
    assert_kept(model, feeds, Reason.NOT_CONSTANT, verify=False)


def test_not_constant_reshape_shape_computed(rng):
    """Gemm -> Reshape(shape computed from the input) -> BN: the Reshape's shape is not constant."""
    bn_node, inits = bn("bn", "r", "y", bn_params(rng, 4))
    nodes = [helper.make_node("Gemm", ["a", "B"], ["g"], name="gemm"),
             helper.make_node("Shape", ["a"], ["ashape"], name="shape", end=1),
             helper.make_node("Concat", ["ashape", "tail"], ["newshape"], name="concat", axis=0),
             helper.make_node("Reshape", ["g", "newshape"], ["r"], name="reshape"), bn_node]
    model = make_model(nodes, [vi("a", ["N", 6])], [vi("y", 4)],
                       inits + [init("B", rand(rng, 6, 4)), init("tail", np.array([4, 1, 1], np.int64))])
    assert_kept(model, {"a": rand(rng, 3, 6)}, Reason.NOT_CONSTANT)


# ---- CHANNEL_MISMATCH -----------------------------------------------------------------------
def test_channel_mismatch_add_constant_on_last_axis(rng):
    """Conv -> Add(constant of shape (W,), W == C) -> BN: broadcasts over the width, not the channels."""
    c = 4
    bn_node, inits = bn("bn", "a", "y", bn_params(rng, c))
    model = make_model([_conv("conv", "x", "w", "z"), helper.make_node("Add", ["z", "wc"], ["a"], name="add"), bn_node],
                       [vi("x", ["N", 3, 6, 6])], [vi("y", 4)],
                       inits + [init("w", rand(rng, c, 3, 3, 3)), init("wc", rand(rng, c))])  # conv out is 4x4
    assert_kept(model, {"x": rand(rng, 2, 3, 6, 6)}, Reason.CHANNEL_MISMATCH)


def test_channel_mismatch_matmul_rank3_input(rng):
    """x (N, T, K) @ W (K, T): output columns are on the last axis, BN normalises axis 1 (T)."""
    t, k = 4, 5
    bn_node, inits = bn("bn", "z", "y", bn_params(rng, t))
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["z"], name="mm"), bn_node],
                       [vi("x", ["N", t, k])], [vi("y", 3)], inits + [init("w", rand(rng, k, t))])
    assert_kept(model, {"x": rand(rng, 2, t, k)}, Reason.CHANNEL_MISMATCH)


def test_channel_mismatch_gemm_full_c(rng):
    """Gemm with a C of shape (M, N): not one bias per column."""
    bn_node, inits = bn("bn", "z", "y", bn_params(rng, 4))
    model = make_model([helper.make_node("Gemm", ["a", "B", "C"], ["z"], name="gemm"), bn_node],
                       [vi("a", [3, 6])], [vi("y", [3, 4])],
                       inits + [init("B", rand(rng, 6, 4)), init("C", rand(rng, 3, 4))])
    assert_kept(model, {"a": rand(rng, 3, 6)}, Reason.CHANNEL_MISMATCH)


def test_channel_mismatch_unsqueeze_axis_1(rng):
    """Gemm (M, N) -> Unsqueeze(axes=[1]) -> (M, 1, N) -> BN over 1 channel."""
    p = bn_params(rng, 1)
    bn_node, inits = bn("bn", "u", "y", p)
    model = make_model([helper.make_node("Gemm", ["a", "B"], ["g"], name="gemm"),
                        helper.make_node("Unsqueeze", ["g", "axes"], ["u"], name="unsq"), bn_node],
                       [vi("a", [3, 6])], [vi("y", 3)],
                       inits + [init("B", rand(rng, 6, 4)), init("axes", np.array([1], np.int64))])
    rec, _ = assert_kept(model, {"a": rand(rng, 3, 6)}, Reason.CHANNEL_MISMATCH)


def test_channel_mismatch_channel_count(rng):
    """Gemm -> Reshape([0, 2, 2]) -> BN(2 channels): the Gemm's 4 columns are not the BN's 2 channels."""
    bn_node, inits = bn("bn", "r", "y", bn_params(rng, 2))
    model = make_model([helper.make_node("Gemm", ["a", "B"], ["g"], name="gemm"),
                        helper.make_node("Reshape", ["g", "shape"], ["r"], name="reshape"), bn_node],
                       [vi("a", ["N", 6])], [vi("y", 3)],
                       inits + [init("B", rand(rng, 6, 4)), init("shape", np.array([0, 2, 2], np.int64))])
    assert_kept(model, {"a": rand(rng, 3, 6)}, Reason.CHANNEL_MISMATCH)


# ---- UNKNOWN_RANK ---------------------------------------------------------------------------
def test_unknown_rank_matmul_input_without_shape(rng):
    """MatMul fed by a Relu whose output has no shape information: axis 1 cannot be proven."""
    k, n = 5, 4
    bn_node, inits = bn("bn", "z", "y", bn_params(rng, n))
    model = make_model([helper.make_node("Relu", ["x"], ["r"], name="relu"),
                        helper.make_node("MatMul", ["r", "w"], ["z"], name="mm"), bn_node],
                       [vi("x", ["N", k])], [vi("y", 2)], inits + [init("w", rand(rng, k, n))])
    assert_kept(model, {"x": rand(rng, 3, k)}, Reason.UNKNOWN_RANK)


# ---- DTYPE_OVERFLOW / UNSUPPORTED_DTYPE -----------------------------------------------------
def _fp16_conv_bn(rng, w, gamma):
    c = w.shape[0]
    p = {"scale": np.full(c, gamma, np.float16), "bias": np.zeros(c, np.float16),
         "mean": np.zeros(c, np.float16), "var": np.ones(c, np.float16)}
    bn_node, inits = bn("bn", "z", "y", p)
    return make_model([_conv("conv", "x", "w", "z"), bn_node],
                      [vi("x", ["N", 3, 4, 4], FLOAT16)], [vi("y", 4, FLOAT16)], inits + [init("w", w)])


def test_dtype_overflow_fp16(rng):
    w = (rand(rng, 2, 3, 3, 3) * 0.01).astype(np.float16)
    w[0, 0, 1, 1] = 100.0  # 100 * 1000 = 1e5 > 65504
    model = _fp16_conv_bn(rng, w, 1000.0)
    x = (rand(rng, 2, 3, 4, 4) * 1e-3).astype(np.float16)
    rec, res = assert_kept(model, {"x": x}, Reason.DTYPE_OVERFLOW, rtol=1e-2, atol=1e-2)
    conv = next(n for n in res.model.graph.node if n.op_type == "Conv")
    w_after = next(t for t in res.model.graph.initializer if t.name == conv.input[1])
    np.testing.assert_array_equal(numpy_helper.to_array(w_after), w)
    assert np.isfinite(ort_run(res.model, {"x": x})[0]).all()


def test_dtype_underflow_fp16_to_subnormal(rng):
    w = np.full((2, 3, 1, 1), 1e-3, np.float16)  # normal in fp16 (min normal 6.1e-5)
    model = _fp16_conv_bn(rng, w, 1e-3)  # 1e-6: subnormal in fp16
    x = rand(rng, 2, 3, 4, 4, dtype=np.float16)
    assert_kept(model, {"x": x}, Reason.DTYPE_OVERFLOW, rtol=1e-2, atol=1e-2)


def test_unsupported_dtype_integer_weight_is_refused():
    """Not reachable from a valid model (Conv takes float weights only); check the guard anyway on a
    deliberately ill-typed graph, without onnxruntime."""
    p = {k: np.ones(2, np.float32) for k in ("scale", "bias", "mean", "var")}
    bn_node, inits = bn("bn", "z", "y", p)
    model = make_model([_conv("conv", "x", "w", "z"), bn_node], [vi("x", ["N", 3, 4, 4])], [vi("y", 4)],
                       inits + [init("w", np.ones((2, 3, 1, 1), np.int64))], check=False)
    res = fold(model, verify=False)
    rec = record(res, "bn")
    assert (rec.action, rec.reason) == (Action.FROZEN_KEPT, Reason.UNSUPPORTED_DTYPE)
    insp = {i.name: i.decision for i in inspect(model)}["bn"]
    assert (insp.action, insp.reason) == (Action.FROZEN_KEPT, Reason.UNSUPPORTED_DTYPE)
    assert count_op(res.model, "BatchNormalization") == 1


# ---- IN_SUBGRAPH / SPATIAL_ZERO -------------------------------------------------------------
def _if_model(rng):
    p = bn_params(rng, 3)
    bn_node, bn_inits = bn("bn", "x", "tb", p)
    then_g = helper.make_graph([bn_node], "then", [], [vi("tb", ["N", 3, 4, 4])], initializer=bn_inits)
    else_g = helper.make_graph([helper.make_node("Relu", ["x"], ["eb"], name="relu")], "else", [],
                               [vi("eb", ["N", 3, 4, 4])])
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], name="sum", keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["cond"], name="gt"),
             helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g)]
    return make_model(nodes, [vi("x", ["N", 3, 4, 4])], [vi("y", ["N", 3, 4, 4])],
                      [init("zero", np.array(0.0, np.float32))]), p


def test_in_subgraph_bn_kept(rng):
    model, p = _if_model(rng)
    x_pos = np.abs(rand(rng, 1, 3, 4, 4))
    x_neg = -np.abs(rand(rng, 1, 3, 4, 4))
    rec, res = assert_kept(model, {"x": x_pos}, Reason.IN_SUBGRAPH)
    assert_same_outputs(model, res.model, {"x": x_neg})
    # the BN really was computed in the then-branch: compare with numpy
    np.testing.assert_allclose(ort_run(res.model, {"x": x_pos})[0],
                               npref.batchnorm(x_pos, p["scale"], p["bias"], p["mean"], p["var"], EPS),
                               rtol=1e-5, atol=1e-5)
    insp = [i for i in inspect(model) if i.name.endswith("::bn")][0]
    assert insp.graph_path and insp.name.startswith(insp.graph_path)  # its location inside the If


def test_spatial_zero_legacy_bn_kept(rng):
    """opset 7 BN with spatial=0 (per-activation statistics): kept, with its own reason."""
    p = {k: (np.abs(rand(rng, 3, 2, 2)) + 0.5).astype(np.float32) for k in ("scale", "bias", "mean", "var")}
    bn_node, inits = bn("bn", "z", "y", p, spatial=0)
    model = make_model([_conv("conv", "x", "w", "z", pads=[1, 1, 1, 1]), bn_node],
                       [vi("x", ["N", 3, 2, 2])], [vi("y", 4)], inits + [init("w", rand(rng, 3, 3, 3, 3))],
                       opset=7, ir_version=4)
    assert_kept(model, {"x": rand(rng, 2, 3, 2, 2)}, Reason.SPATIAL_ZERO)


# ---- SHARED_WEIGHT_CLONED -------------------------------------------------------------------
def test_shared_weight_two_convs_each_with_own_bn(rng):
    w = rand(rng, 4, 3, 3, 3)
    b = rand(rng, 4)
    p1, p2 = bn_params(rng, 4), bn_params(rng, 4)
    bn1, i1 = bn("bn1", "z1", "y1", p1)
    bn2, i2 = bn("bn2", "z2", "y2", p2)
    model = make_model([helper.make_node("Conv", ["x1", "w", "b"], ["z1"], name="conv1"),
                        helper.make_node("Conv", ["x2", "w", "b"], ["z2"], name="conv2"), bn1, bn2],
                       [vi("x1", ["N", 3, 5, 5]), vi("x2", ["N", 3, 5, 5])], [vi("y1", 4), vi("y2", 4)],
                       [init("w", w), init("b", b)] + i1 + i2)
    before = model.SerializeToString()
    x1, x2 = rand(rng, 2, 3, 5, 5), rand(rng, 2, 3, 5, 5)
    res = fold(model)
    for name, target in (("bn1", "conv1"), ("bn2", "conv2")):
        rec = record(res, name)
        assert (rec.action, rec.target, rec.reason) == (Action.FOLDED, target, Reason.SHARED_WEIGHT_CLONED)
    insp = {i.name: i.decision for i in inspect(model)}
    assert insp["bn1"].reason is insp["bn2"].reason is Reason.SHARED_WEIGHT_CLONED
    assert model.SerializeToString() == before, "the caller's model must not be modified"
    assert count_op(res.model, "BatchNormalization") == 0
    check_full(res.model)
    convs = [n for n in res.model.graph.node if n.op_type == "Conv"]
    assert convs[0].input[1] != convs[1].input[1], "each folded Conv needs its own weight"
    y1, y2 = ort_run(res.model, {"x1": x1, "x2": x2})
    np.testing.assert_allclose(y1, npref.batchnorm(npref.conv(x1, w, b), p1["scale"], p1["bias"], p1["mean"],
                                                   p1["var"], EPS), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(y2, npref.batchnorm(npref.conv(x2, w, b), p2["scale"], p2["bias"], p2["mean"],
                                                   p2["var"], EPS), rtol=1e-4, atol=1e-4)
    assert res.report.verification.passed


def test_shared_weight_one_conv_applied_twice(rng):
    """The same conv applied twice in sequence (weight tied), each application followed by its own BN."""
    w = rand(rng, 3, 3, 3, 3)
    p1, p2 = bn_params(rng, 3), bn_params(rng, 3)
    bn1, i1 = bn("bn1", "z1", "y1", p1)
    bn2, i2 = bn("bn2", "z2", "y", p2)
    model = make_model([_conv("conv1", "x", "w", "z1", pads=[1] * 4), bn1, _conv("conv2", "y1", "w", "z2", pads=[1] * 4), bn2],
                       [vi("x", ["N", 3, 5, 5])], [vi("y", 4)], [init("w", w)] + i1 + i2)
    rec, _, res = outcome(model, {"x": rand(rng, 2, 3, 5, 5)}, "bn1", rtol=1e-4, atol=1e-4)
    assert rec.action is Action.FOLDED and rec.reason is Reason.SHARED_WEIGHT_CLONED
    assert record(res, "bn2").action is Action.FOLDED
    assert count_op(res.model, "BatchNormalization") == 0


def test_shared_weight_with_unfolded_reader(rng):
    """conv1 (weight w) -> BN; conv2 reads the same w and has no BN: conv2 must keep the original w."""
    w = rand(rng, 4, 3, 3, 3)
    bn1, i1 = bn("bn", "z1", "y1", bn_params(rng, 4))
    model = make_model([_conv("conv1", "x", "w", "z1"), bn1, _conv("conv2", "x", "w", "y2")],
                       [vi("x", ["N", 3, 5, 5])], [vi("y1", 4), vi("y2", 4)], [init("w", w)] + i1)
    rec, _, res = outcome(model, {"x": rand(rng, 2, 3, 5, 5)})
    assert rec.action is Action.FOLDED and rec.reason is Reason.SHARED_WEIGHT_CLONED
    conv2 = next(n for n in res.model.graph.node if n.name == "conv2")
    w2 = next(t for t in res.model.graph.initializer if t.name == conv2.input[1])
    np.testing.assert_array_equal(numpy_helper.to_array(w2), w)


def test_shared_weight_used_by_gemm_and_matmul(rng):
    """One (K, N) weight feeding a Gemm->BN and a plain MatMul."""
    k, n = 6, 4
    wt = rand(rng, k, n)
    bn1, i1 = bn("bn", "g", "y1", bn_params(rng, n))
    model = make_model([helper.make_node("Gemm", ["a", "w"], ["g"], name="gemm"), bn1,
                        helper.make_node("MatMul", ["a", "w"], ["y2"], name="mm")],
                       [vi("a", [3, k])], [vi("y1", [3, n]), vi("y2", [3, n])], [init("w", wt)] + i1)
    rec, _, _ = outcome(model, {"a": rand(rng, 3, k)})
    assert rec.action is Action.FOLDED and rec.reason is Reason.SHARED_WEIGHT_CLONED


def test_bn_inside_a_model_local_function_is_reported(rng):
    p = bn_params(rng, 3)
    fn_nodes = [helper.make_node("Constant", [], [k], name=f"c_{k}", value=numpy_helper.from_array(v, k))
                for k, v in p.items()]
    fn_nodes.append(helper.make_node("BatchNormalization", ["X", "scale", "bias", "mean", "var"], ["Y"], name="bn"))
    fn = helper.make_function("local", "BnBlock", ["X"], ["Y"], fn_nodes,
                              opset_imports=[helper.make_opsetid("", 17)])
    graph = helper.make_graph([helper.make_node("BnBlock", ["x"], ["y"], domain="local", name="call")], "g",
                              [vi("x", ["N", 3, 4, 4])], [vi("y", ["N", 3, 4, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                              functions=[fn])
    model.ir_version = 10
    check_full(model)
    x = rand(rng, 2, 3, 4, 4)
    res = fold(model)
    [rec] = res.report.bns
    assert (rec.action, rec.reason) == (Action.FROZEN_KEPT, Reason.IN_SUBGRAPH)
    [row] = inspect(model)
    assert row.decision.reason is Reason.IN_SUBGRAPH and "local" in row.graph_path
    np.testing.assert_allclose(ort_run(res.model, {"x": x})[0],
                               npref.batchnorm(x, p["scale"], p["bias"], p["mean"], p["var"], EPS), rtol=1e-5, atol=1e-5)


def test_bn_inside_loop_body_is_reported(rng):
    p = bn_params(rng, 3)
    bn_node, bn_inits = bn("bn", "state_in", "state_out", p)
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep"), bn_node],
        "body", [vi("i", [], INT64), vi("cond_in", [], TensorProto.BOOL), vi("state_in", ["N", 3, 4, 4])],
        [vi("cond_out", [], TensorProto.BOOL), vi("state_out", ["N", 3, 4, 4])], initializer=bn_inits)
    model = make_model([helper.make_node("Loop", ["trip", "cond", "x"], ["y"], name="loop", body=body)],
                       [vi("x", ["N", 3, 4, 4])], [vi("y", ["N", 3, 4, 4])],
                       [init("trip", np.array(2, np.int64)), init("cond", np.array(True))])
    x = rand(rng, 2, 3, 4, 4)
    rec, res = assert_kept(model, {"x": x}, Reason.IN_SUBGRAPH)
    once = npref.batchnorm(x, p["scale"], p["bias"], p["mean"], p["var"], EPS)
    np.testing.assert_allclose(ort_run(res.model, {"x": x})[0],
                               npref.batchnorm(once, p["scale"], p["bias"], p["mean"], p["var"], EPS), rtol=1e-4, atol=1e-4)


def test_matmul_unsqueeze_bn2d_gets_a_broadcastable_bias(rng):
    """MatMul (N, C) -> Unsqueeze -> BN2d: the inserted bias Add sits after the Unsqueeze, shaped (C, 1, 1)."""
    k, n = 5, 4
    p = bn_params(rng, n)
    bn_node, inits = bn("bn", "u", "y", p)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
                        helper.make_node("Unsqueeze", ["m", "axes"], ["u"], name="unsq"), bn_node],
                       [vi("x", ["N", k])], [vi("y", 4)],
                       inits + [init("w", rand(rng, k, n)), init("axes", np.array([2, 3], np.int64))])
    rec, _, res = outcome(model, {"x": rand(rng, 3, k)})
    assert rec.action is Action.FOLDED and rec.target == "mm"


@pytest.mark.parametrize("attrs", [{"auto_pad": "VALID"}, {"pads": [0, 0, 0, 0]}])
def test_forward_fold_unpadded_spellings(rng, attrs):
    bn_node, inits = bn("bn", "x", "xn", bn_params(rng, 3))
    model = make_model([bn_node, _conv("conv", "xn", "w", "y", **attrs)],
                       [vi("x", ["N", 3, 5, 5])], [vi("y", 4)], inits + [init("w", rand(rng, 4, 3, 3, 3))])
    rec, _, res = outcome(model, {"x": rand(rng, 2, 3, 5, 5)})
    assert (rec.action, rec.direction, rec.target) == (Action.FOLDED, "forward", "conv")


def test_main_and_subgraph_bn_with_the_same_name_are_reported_apart(rng):
    """Node names are unique per graph only: a main-graph BN 'bn' (folded) and a BN 'bn' inside an
    If branch (kept) must get one record each, with their own decisions."""
    sub_bn, sub_inits = bn("bn", "z", "tb", bn_params(rng, 4), prefix="sub")
    then_g = helper.make_graph([sub_bn], "then", [], [vi("tb", ["N", 4, 5, 5])], initializer=sub_inits)
    else_g = helper.make_graph([helper.make_node("Relu", ["z"], ["eb"], name="relu")], "else", [],
                               [vi("eb", ["N", 4, 5, 5])])
    main_bn, main_inits = bn("bn", "z2", "y2", bn_params(rng, 4), prefix="main")
    nodes = [_conv("conv", "x", "w", "z", pads=[1] * 4), _conv("conv2", "x", "w2", "z2", pads=[1] * 4), main_bn,
             helper.make_node("If", ["c"], ["y"], name="if", then_branch=then_g, else_branch=else_g)]
    model = make_model(nodes, [vi("x", ["N", 3, 5, 5]), vi("c", [], TensorProto.BOOL)],
                       [vi("y", ["N", 4, 5, 5]), vi("y2", 4)],
                       [init("w", rand(rng, 4, 3, 3, 3)), init("w2", rand(rng, 4, 3, 3, 3))] + main_inits)
    res = fold(model, verify=False)
    assert count_op(res.model, "BatchNormalization") == 0  # the main-graph BN was folded
    outcomes = sorted((r.action.value, r.target or "") for r in res.report.bns)
    assert outcomes == [("folded", "conv2"), ("frozen-kept", "")], res.report.bns
    rows = sorted((i.graph_path, i.decision.action.value) for i in inspect(model))
    assert rows == [("", "folded"), ("if.then_branch", "frozen-kept")]
    for c in (True, False):
        feeds = {"x": rand(rng, 2, 3, 5, 5), "c": np.array(c)}
        assert_same_outputs(model, res.model, feeds)


def test_unnamed_subgraph_bns_are_identifiable_in_the_report(rng):
    b1, i1 = bn("", "x", "tb", bn_params(rng, 3), prefix="t")
    b2, i2 = bn("", "x", "eb", bn_params(rng, 3), prefix="e")
    then_g = helper.make_graph([b1], "then", [], [vi("tb", ["N", 3, 4, 4])], initializer=i1)
    else_g = helper.make_graph([b2], "else", [], [vi("eb", ["N", 3, 4, 4])], initializer=i2)
    model = make_model([helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
                       [vi("x", ["N", 3, 4, 4]), vi("c", [], TensorProto.BOOL)], [vi("y", ["N", 3, 4, 4])])
    res = fold(model, verify=False)
    assert [r.reason for r in res.report.bns] == [Reason.IN_SUBGRAPH] * 2
    names = [r.name for r in res.report.bns]
    assert all(names) and len(set(names)) == 2, names


def test_dtype_overflow_emits_no_numpy_warning(rng):
    import warnings

    w = np.full((2, 3, 1, 1), 100.0, np.float16)
    model = _fp16_conv_bn(rng, w, 1000.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = fold(model, verify=False)
    assert record(res, "bn").reason is Reason.DTYPE_OVERFLOW
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]


# ---- every reason is covered ----------------------------------------------------------------
def test_every_reason_has_a_test():
    """Each reason code is asserted in this file, or (PyTorch-only codes such as HOOKED) in the
    PyTorch front end's tests."""
    import sys
    from pathlib import Path

    here = Path(sys.modules[__name__].__file__)
    source = here.read_text().replace("Reason.{r.name}", "")
    source += "".join(p.read_text() for p in sorted(here.parent.glob("test_torch_*.py")))
    missing = [r.name for r in Reason if f"Reason.{r.name}" not in source]
    assert not missing, f"reasons without a test: {missing}"
