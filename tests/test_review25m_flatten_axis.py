"""Review 25m: a constant computed by Flatten with axis = rank (legal: axis lies in [-r, r]) has
shape (size, 1); the constant evaluator wrapped the axis to 0 and read (1, size), so a Gemm
weight written that way was kept as CHANNEL_MISMATCH ('15 output channels, BN has 1')."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import init, make_model, vi
from onnx import helper

from bnfold.api import fold
from bnfold.graph.constants import Constants
from bnfold.graph.index import GraphIndex
from bnfold.records import Action


@pytest.mark.parametrize(("axis", "shape"), [(2, (15, 1)), (0, (1, 15)), (-2, (1, 15)), (1, (3, 5)), (-1, (3, 5))])
def test_flatten_constant_axis_range(axis, shape):
    b0 = np.arange(15, dtype=np.float32).reshape(3, 5)
    m = make_model([helper.make_node("Flatten", ["B0"], ["B"], axis=axis), helper.make_node("Identity", ["B"], ["y"])],
                   [], [vi("y", 2)], [init("B0", b0)])
    index = GraphIndex(m.graph, 17)
    v = Constants(index).value("B")
    assert v is not None and v.shape == shape and np.array_equal(v.reshape(-1), b0.reshape(-1))


def test_gemm_weight_from_flatten_axis_rank_folds(tmp_path):
    rng = np.random.default_rng(0)
    inits = [init("B0", rng.standard_normal((3, 5)).astype(np.float32)),
             init("s", np.full(1, 1.5, np.float32)), init("b", np.full(1, 0.2, np.float32)),
             init("m", np.full(1, 0.1, np.float32)), init("v", np.full(1, 2.0, np.float32))]
    nodes = [helper.make_node("Flatten", ["B0"], ["B"], axis=2, name="flat"),
             helper.make_node("Gemm", ["a", "B"], ["g"], name="gemm"),
             helper.make_node("BatchNormalization", ["g", "s", "b", "m", "v"], ["y"], name="bn")]
    m = make_model(nodes, [vi("a", [2, 15])], [vi("y", [2, 1])], inits)
    res = fold(m, output=tmp_path / "o.onnx")
    assert res.rows[0].decision.action is Action.FOLDED, res.rows[0].decision
    assert res.report.verification.passed
