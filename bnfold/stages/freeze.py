"""Stage 3: write population statistics into every BN, turning it into a plain inference BN.

A frozen BN has one output, no ``training_mode``, and constant mean/var initializers. Nodes that
computed batch statistics for it (the decomposed ReduceMean/Sub/Mul pattern) are removed once
nothing else reads them. Extra outputs (updated running statistics) that somebody still reads
are served by Identity nodes of the frozen statistics.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnfold.errors import BadInputError
from bnfold.graph.attrs import drop_attr
from bnfold.graph.constants import raw_values
from bnfold.graph.index import GraphIndex
from bnfold.records import FrozenStats
from bnfold.stages.discover import BnSite
from bnfold.stages.work import Work


def stats_dtype(index: GraphIndex, node: onnx.NodeProto) -> np.dtype:
    """dtype for the mean/var inputs: that of the stored mean, else of the scale. Since opset 15
    mean/var have their own type (T2, e.g. float32 statistics beside a float16 scale); before it
    they share the scale's, so the mean's type is valid for every opset. Writing statistics in the
    scale's float16 would round them and overflow at variances above 65504."""
    for slot in (3, 4, 1):
        et = index.elem_type(node.input[slot]) if slot < len(node.input) else None
        if et:
            return np.dtype(helper.tensor_dtype_to_np_dtype(et))
    et = index.elem_type(node.input[0])
    return np.dtype(helper.tensor_dtype_to_np_dtype(et)) if et else np.dtype(np.float32)


def freeze(work: Work, stats: dict[str, FrozenStats]) -> None:
    """Write ``stats`` into the BNs of the main graph named in it, and commit."""
    _write(work.index, work.sites, stats)
    work.commit()


def _write(index: GraphIndex, sites: list[BnSite], stats: dict[str, FrozenStats]) -> None:
    for site in sites:
        if site.pos is None or site.info.name not in stats:
            continue
        st = stats[site.info.name]
        pos = site.pos
        node = index.nodes[pos]
        dtype = stats_dtype(index, node)
        names = []
        for kind, arr in (("mean", st.mean), ("var", st.var)):
            name = index.fresh_name(f"{node.name}.frozen_{kind}")
            index.add_initializer(numpy_helper.from_array(arr.astype(dtype), name))
            names.append(name)
        old = [node.input[3], node.input[4]]
        index.set_input(pos, 3, names[0])
        index.set_input(pos, 4, names[1])
        drop_attr(node, "training_mode")
        if index.opset < 7:
            drop_attr(node, "is_test")
            node.attribute.append(helper.make_attribute("is_test", 1))
        for k, out in enumerate(index.drop_outputs(pos, 1)):
            if not out:
                continue
            if index.use_count(out) and k < 2:
                ident = helper.make_node("Identity", [names[k]], [out],
                                         name=index.fresh_node_name(f"{node.name}.frozen_out{k + 1}"))
                index.insert_node(pos + 1, ident)
        for name in old:
            index.remove_dead_producers(name)


def check_variances(work: Work) -> None:
    """Refuse a main-graph BN whose ``var + epsilon`` is not a positive finite number in some
    channel: its inference form divides by zero (``epsilon=0`` over a channel of zero variance) or
    holds corrupt statistics, and no fold of it exists; likewise a NaN or infinite scale, bias or
    mean (the model computes NaN there, folded or not). Run on the statistics the model will have:
    after ``freeze`` (calibrated) or as stored (inference BNs). Subgraph BNs and parameters that
    are not constants (graph inputs) are left as they are."""
    index = work.index
    sites = [s for s in work.sites if s.pos is not None]
    nodes = [index.nodes[s.pos] for s in sites if s.pos is not None]
    if _all_fine(work, sites, nodes):
        return
    for site, node in zip(sites, nodes):
        for slot, what in ((1, "scale"), (2, "bias"), (3, "mean")):
            value = work.consts.value(node.input[slot])
            if value is not None:
                _check_finite(site.info.name, what, np.asarray(value, dtype=np.float64).reshape(-1))
        var = work.consts.value(node.input[4])
        if var is not None:
            _check_one(site.info.name, np.asarray(var, dtype=np.float64).reshape(-1), site.info.epsilon)


def _all_fine(work: Work, sites: list[BnSite], nodes: list[onnx.NodeProto]) -> bool:
    """One vectorised test for the common case, every parameter a raw initializer: all finite and
    every ``var + epsilon`` positive."""
    inits = work.index.initializers
    flat = [raw_values(inits, [n.input[slot] for n in nodes], rank=1) for slot in (1, 2, 3, 4)]
    if any(f is None for f in flat):
        return False
    if not all(bool(np.isfinite(values).all()) for values, _ in flat[:3] if values.size):  # type: ignore[misc]
        return False
    values, counts = flat[3]  # type: ignore[misc]
    eps = np.repeat(np.array([s.info.epsilon for s in sites], dtype=np.float64), counts)
    denom = values.astype(np.float64) + eps
    return bool((np.isfinite(denom) & (denom > 0)).all())


def check_stored_stats(bn: str, mean: np.ndarray, var: np.ndarray, eps: float) -> None:
    """``check_variances``'s test of one BN's mean and variance (float64 arrays), for statistics
    checked before calibration (those the data will not replace)."""
    _check_finite(bn, "mean", mean.reshape(-1))
    _check_one(bn, var.reshape(-1), eps)


def _check_finite(bn: str, what: str, value: np.ndarray) -> None:
    bad = np.flatnonzero(~np.isfinite(value))
    if bad.size:
        shown = ", ".join(map(str, bad[:5].tolist())) + (", ..." if bad.size > 5 else "")
        raise BadInputError(
            f"BN '{bn}' has a NaN or infinite {what} in channel(s) {shown}, so the model computes NaN or Inf there; "
            "its parameters are corrupt: export it again from a model with finite weights")


def _check_one(bn: str, var: np.ndarray, eps: float) -> None:
    denom = var + eps
    bad = np.flatnonzero(~(np.isfinite(denom) & (denom > 0)))
    if not bad.size:
        return
    shown = ", ".join(map(str, bad[:5].tolist())) + (", ..." if bad.size > 5 else "")
    if eps <= 0 and bool(np.all(var[bad] == 0)):
        raise BadInputError(
            f"BN '{bn}' has epsilon={eps:g} and a variance of 0 in channel(s) {shown}, so it divides by zero; "
            "give the BN a positive epsilon (e.g. 1e-5) when exporting the model")
    raise BadInputError(
        f"BN '{bn}' has var + epsilon (epsilon={eps:g}) that is not a positive finite number in channel(s) "
        f"{shown} (a negative, NaN or infinite variance); the model's BN statistics are corrupt: export it again")
