"""Helpers for the rule tests: the ONNX planner (the rules' GraphView) over a one-node graph, and
an independent float64 BN (scale, shift) with numpy's own formula."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from conftest import make_model

from bnfold.graph.constants import Constants
from bnfold.graph.index import GraphIndex
from bnfold.rules import Refuse
from bnfold.stages.plan import Planner


def view(node: onnx.NodeProto, inputs: Sequence[onnx.ValueInfoProto], outputs: Sequence[onnx.ValueInfoProto],
         initializers: Sequence[onnx.TensorProto] = (), value_info: Sequence[onnx.ValueInfoProto] = ()) -> Planner:
    """The planner of a graph holding ``node`` (not checked: rules must refuse odd graphs too)."""
    model = make_model([node], inputs, outputs, initializers, value_info=value_info, check=False)
    index = GraphIndex(model.graph, 17)
    return Planner(index, Constants(index))


def refusal(fn, *args):
    """The (reason, detail) of the Refuse that ``fn(*args)`` raises."""
    try:
        fn(*args)
    except Refuse as exc:
        return exc.reason, exc.detail
    raise AssertionError("no refusal")


def scale_shift(rng: np.random.Generator, c: int, eps: float = 1e-5):
    """A BN's (gamma, beta, mean, var, eps) and its float64 (s, t) = (gamma/sqrt(var+eps), beta - s*mean)."""
    gamma, beta, mean = rng.standard_normal(c), rng.standard_normal(c), rng.standard_normal(c)
    var = rng.uniform(0.1, 2.0, c)
    s = gamma / np.sqrt(var + eps)
    return (gamma, beta, mean, var, eps), s, beta - s * mean
