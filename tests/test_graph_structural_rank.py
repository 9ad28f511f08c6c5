"""Flatten and Gemm always write a matrix (rank 2), so a BN after Flatten -> MatMul, or after Gemm,
needs no value_info to be proven on the channel axis: it folds (it was kept as UNKNOWN_RANK when
the exporter wrote no value_info; review 25m). Where the rank is not fixed by the operator (a
MatMul on an input of unknown rank), it stays UNKNOWN_RANK."""
from __future__ import annotations

import numpy as np
from conftest import bn, bn_params, init, make_model, ort_run, vi
from onnx import helper

import bnfold
from bnfold.graph.index import GraphIndex


def _model(rng, head: str, x_shape):
    c = 8
    p = bn_params(rng, c)
    if head == "flatten_matmul":
        nodes = [helper.make_node("Flatten", ["x"], ["f"], name="flat", axis=1),
                 helper.make_node("MatMul", ["f", "w"], ["h"], name="mm")]
        inits = [init("w", rng.normal(size=(48, c)).astype(np.float32))]
    elif head == "gemm":
        nodes = [helper.make_node("Gemm", ["x", "w", "gb"], ["h"], name="gemm", transB=1)]
        inits = [init("w", rng.normal(size=(c, 48)).astype(np.float32)), init("gb", rng.normal(size=c).astype(np.float32))]
    else:  # a MatMul straight on an input whose rank nobody states
        nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm")]
        inits = [init("w", rng.normal(size=(48, c)).astype(np.float32))]
    node, bn_inits = bn("bn", "h", "y", p)
    nodes.append(node)
    inits += bn_inits
    return make_model(nodes, [vi("x", x_shape)], [vi("y", ["N", c])], inits, check=x_shape is not None)


def test_bn_after_flatten_matmul_or_gemm_folds_without_value_info(rng) -> None:
    for head, shape in (("flatten_matmul", ["N", 3, 4, 4]), ("gemm", ["N", 48])):
        model = _model(rng, head, shape)
        assert not model.graph.value_info
        result = bnfold.fold(model)
        (record,) = result.report.bns
        assert record.action.value == "folded", (head, record.reason, record.detail)
        x = rng.normal(size=[2] + shape[1:]).astype(np.float32)
        np.testing.assert_allclose(ort_run(result.model, {"x": x})[0], ort_run(model, {"x": x})[0],
                                   rtol=1e-5, atol=1e-5)


def test_rank_is_structural_only_where_the_operator_fixes_it(rng) -> None:
    model = _model(rng, "matmul", None)
    idx = GraphIndex(model.graph, 15)
    assert idx.rank("h") is None
    (record,) = bnfold.fold(model, verify=False).report.bns
    assert record.reason is not None and record.reason.value == "UNKNOWN_RANK"
    assert GraphIndex(_model(rng, "gemm", ["N", 48]).graph, 15).rank("h") == 2
