"""Review 25m: constant integer Div truncates toward zero as ONNX/onnxruntime do; the evaluator
floored (numpy ``//``), so a weight computed as Cast(Div(int weights, 2)) was folded from wrong
values and verification failed (nothing written, but the BN was not folded)."""
from __future__ import annotations

import numpy as np
from conftest import init, make_model, vi
from onnx import TensorProto, helper

from bnfold.api import fold
from bnfold.graph.constants import Constants
from bnfold.graph.index import GraphIndex

C = 4


def test_integer_div_truncates():
    a = np.array([-3, 3, -4, 7, -7], np.int64)
    b = np.array([2, -2, 2, -3, -3], np.int64)
    m = make_model([helper.make_node("Div", ["a", "b"], ["q"]), helper.make_node("Identity", ["q"], ["y"])],
                   [], [vi("y", 1, TensorProto.INT64)], [init("a", a), init("b", b)])
    v = Constants(GraphIndex(m.graph, 17)).value("q")
    assert v is not None and v.tolist() == [-1, -1, -2, -2, 2]


def test_weight_from_integer_div_folds_and_verifies(tmp_path):
    rng = np.random.default_rng(0)
    inits = [init("Wi", rng.integers(-50, 50, (C, 3, 3, 3)).astype(np.int32)), init("two", np.int32(2)),
             init("s", rng.uniform(0.5, 2, C).astype(np.float32)), init("b", rng.standard_normal(C).astype(np.float32)),
             init("m", rng.standard_normal(C).astype(np.float32)), init("v", rng.uniform(0.5, 2, C).astype(np.float32))]
    nodes = [helper.make_node("Div", ["Wi", "two"], ["Wd"], name="div"),
             helper.make_node("Cast", ["Wd"], ["W"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"], name="bn")]
    m = make_model(nodes, [vi("x", [2, 3, 6, 6])], [vi("y", 4)], inits)
    res = fold(m, output=tmp_path / "o.onnx")
    assert res.report.verification.passed and (tmp_path / "o.onnx").exists()
