"""Review 25m: Conv -> Add(bias) -> BN whose Add bias is an initializer also listed as a graph
input (overridable, old exporters list every initializer) is kept as NOT_CONSTANT naming the bias,
not as 'an Add of two computed tensors'."""
from __future__ import annotations

import numpy as np
from conftest import init, make_model, vi
from onnx import helper

from bnfold.api import fold
from bnfold.records import Action, Reason

C = 4


def test_overridable_add_bias_is_kept_not_constant():
    rng = np.random.default_rng(0)
    inits = [init("W", rng.standard_normal((C, 3, 3, 3)).astype(np.float32)),
             init("cb", rng.standard_normal((1, C, 1, 1)).astype(np.float32)),
             init("s", np.ones(C, np.float32)), init("b", np.zeros(C, np.float32)),
             init("m", np.zeros(C, np.float32)), init("v", np.ones(C, np.float32))]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
             helper.make_node("Add", ["c", "cb"], ["a"], name="add"),
             helper.make_node("BatchNormalization", ["a", "s", "b", "m", "v"], ["y"], name="bn")]
    m = make_model(nodes, [vi("x", [2, 3, 6, 6]), vi("cb", [1, C, 1, 1])], [vi("y", 4)], inits)
    res = fold(m, dry_run=True)
    (row,) = res.rows
    assert row.decision.action is Action.FROZEN_KEPT
    assert row.decision.reason is Reason.NOT_CONSTANT, row.decision
    assert "'cb'" in row.decision.detail and "graph input" in row.decision.detail, row.decision.detail
