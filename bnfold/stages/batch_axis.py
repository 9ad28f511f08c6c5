"""Nodes that reduce over the batch axis: a BatchNorm written out without a BatchNormalization node.

A BN in training mode that an exporter wrote as plain arithmetic (``ReduceMean`` over the batch
and spatial axes, ``Sub``, ``Mul``/``Pow``, ``ReduceMean``, ``Add``, ``Sqrt``, ``Div``, ...) makes
every output depend on the rest of the batch, as a training BN does; with no BatchNormalization
node there is nothing bnfold recognises to freeze. The decomposed pattern that feeds a
BatchNormalization node its batch statistics is recognised (``Mode.DECOMPOSED``) and frozen; any
other reduction whose axes include axis 0 is named in a warning, so that such a model never
passes as one with "no BN in training mode". Read-only: the graph is not changed.
"""
from __future__ import annotations

import numpy as np
import onnx

from bnfold.graph.constants import Constants
from bnfold.graph.index import GraphIndex
from bnfold.records import Mode
from bnfold.stages.discover import BnSite

__all__ = ["REDUCTIONS", "batch_axis_warnings"]

#: the reductions whose axes input became an input (instead of an attribute) at this opset
REDUCTIONS = {"ReduceMean": 18, "ReduceSum": 13, "ReduceSumSquare": 18, "ReduceL2": 18, "ReduceL1": 18,
              "ReduceMax": 18, "ReduceMin": 18, "ReduceProd": 18, "ReduceLogSumExp": 18, "ReduceLogSum": 18}
_TRACE = 64  # producer steps walked back from a decomposed BN's statistics


def batch_axis_warnings(index: GraphIndex, consts: Constants, sites: list[BnSite]) -> list[str]:
    """One warning per main-graph reduction over axis 0 that no recognised BN accounts for."""
    found = [i for i, n in enumerate(index.nodes) if n.op_type in REDUCTIONS and n.domain in ("", "ai.onnx")
             and i not in index.removed]
    if not found:
        return []
    known = _decomposed_statistics(index, sites)
    out = []
    for i in found:
        node = index.nodes[i]
        if id(node) in known or consts.is_constant(node.input[0]):
            continue
        axes = _axes(index, consts, node)
        if axes is None:
            continue
        if axes == "all" or 0 in axes:
            shown = "all axes" if axes == "all" else f"axes {sorted(axes)}"
            out.append(f"node '{node.name}' ({node.op_type} over {shown}) reduces over the batch axis, so the model's "
                       "outputs depend on the rest of the batch (a BatchNorm in training mode written out without a "
                       "BatchNormalization node?); bnfold leaves it as it is: export the model in eval mode, or with "
                       "its BNs as BatchNormalization nodes")
    return out


def _decomposed_statistics(index: GraphIndex, sites: list[BnSite]) -> set[int]:
    """The nodes (by id) that compute the batch statistics of a recognised decomposed BN."""
    seen: set[int] = set()
    for site in sites:
        if site.pos is None or site.info.mode is not Mode.DECOMPOSED:
            continue
        bn = index.nodes[site.pos]
        stack, steps = [n for n in bn.input[3:5] if n], 0
        while stack and steps < _TRACE * 4:
            steps += 1
            node = index.node_of(stack.pop())
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            stack.extend(x for x in node.input if x and x != bn.input[0])
    return seen


def _axes(index: GraphIndex, consts: Constants, node: onnx.NodeProto) -> set[int] | str | None:
    """The node's axes, made non-negative; "all" where it reduces every axis; None where unknown."""
    since = REDUCTIONS[node.op_type]
    attrs = {a.name: a for a in node.attribute}
    if index.opset >= since:
        given = node.input[1] if len(node.input) > 1 and node.input[1] else None
        if given is None:
            noop = "noop_with_empty_axes" in attrs and attrs["noop_with_empty_axes"].i
            return None if noop else "all"
        value = consts.value(given)
        if value is None:
            return None
        raw = [int(a) for a in np.asarray(value).reshape(-1)]
        if not raw:
            noop = "noop_with_empty_axes" in attrs and attrs["noop_with_empty_axes"].i
            return None if noop else "all"
    else:
        if "axes" not in attrs:
            return "all"
        raw = list(attrs["axes"].ints)
    if any(a < 0 for a in raw):
        rank = index.rank(node.input[0])
        if rank is None:
            return {a for a in raw if a >= 0} or None
        raw = [a + rank if a < 0 else a for a in raw]
    return set(raw)
