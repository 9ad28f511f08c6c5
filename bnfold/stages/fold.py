"""Stage 5: apply the plan. The folded tensors come from each producer kind's rule
(:mod:`bnfold.rules`, over the pure float64 formulas of ``arith``); this module only rewires nodes
and writes tensors. Small Conv folds are computed together by the Conv rule's ``fold_cast_many``
(``batched.fold_convs``) from their initializers' raw data, and written back as raw bytes.

A weight is replaced in place only when this node is its sole reader; otherwise the folded node
gets its own copy (the original stays for the other readers). A folded value that does not fit
the weight's dtype cancels that fold: the BN stays, frozen, with DTYPE_OVERFLOW.
"""
from __future__ import annotations

import math
from collections import Counter
from itertools import pairwise

import numpy as np
import onnx
from onnx import helper

from bnfold.formulas import arith, batched
from bnfold.formulas.batched import (
    BatchFolded,
    BatchShare,
    BnParams,
    ConvFold,
    ConvSpec,
    RawValue,
    bounds,
    scale_shift_flat,
    scale_shift_many,
)
from bnfold.graph.constants import (
    Constants,
    array_to_tensor,
    raw_values,
    tensor_to_array,
)
from bnfold.graph.index import GraphIndex
from bnfold.records import Action, Reason
from bnfold.rules import CONV, FORWARD, RULES
from bnfold.run_records import FoldDecision, FoldPlan
from bnfold.stages.plan import Route
from bnfold.stages.work import Work

# a (scale, shift) pair per fold, float64 (C,)
ScaleShift = tuple[np.ndarray, np.ndarray]

# the initializer dtypes whose folds ``batched.fold_convs`` may batch
_FLOATS: dict[int, np.dtype] = {onnx.TensorProto.FLOAT: np.dtype(np.float32),
                                onnx.TensorProto.DOUBLE: np.dtype(np.float64),
                                onnx.TensorProto.FLOAT16: np.dtype(np.float16)}


class _InitConvs:
    """``batched.ConvValues`` over the small Convs' initializers: weights and biases read as one
    concatenated raw-data array each (``raw_values``), or one fold's values as arrays."""

    def __init__(self, applier: _Applier, specs: list[ConvSpec], weights: list[str], biases: list[str]) -> None:
        self.applier, self.specs, self.weights, self.biases = applier, specs, weights, biases

    def concatenated(self, members: list[int]) -> tuple[np.ndarray, np.ndarray | None] | None:
        inits = self.applier.index.initializers
        ws = raw_values(inits, [self.weights[i] for i in members])
        if ws is None or ws[1] != [math.prod(self.specs[i].shape) for i in members]:
            return None
        if not self.biases[members[0]]:  # a batch's folds all have a bias, or none has
            return ws[0], None
        bs = raw_values(inits, [self.biases[i] for i in members], rank=1)
        if bs is None or bs[1] != [self.specs[i].shape[0] for i in members]:
            return None
        return ws[0], bs[0]

    def job(self, i: int) -> ConvFold:
        spec = self.specs[i]
        return ConvFold(self.applier.weight(self.weights[i]), self.applier.value(self.biases[i]), spec.s, spec.t)


class _Applier:
    def __init__(self, index: GraphIndex, consts: Constants, commit: bool) -> None:
        self.index, self.consts, self.commit = index, consts, commit

    def value(self, name: str | None) -> np.ndarray | None:
        return self.consts.value(name) if name else None

    def weight(self, name: str) -> np.ndarray:
        """The value of a weight the planner found constant."""
        w = self.value(name)
        assert w is not None, f"weight '{name}' is not a constant"
        return w

    def bn_params(self, bn: onnx.NodeProto, eps: float) -> BnParams:
        inits, value = self.index.initializers, self.consts.value
        vals: list[np.ndarray] = []
        for name in list(bn.input)[1:5]:
            t = inits.get(name)
            v = tensor_to_array(t) if t is not None else value(name)
            assert v is not None, f"BN parameter '{name}' is not a constant"  # the planner checked it
            vals.append(v)
        gamma, beta, mean, var = vals
        return BnParams(gamma, beta, mean, var, eps)

    def precompute(self, routes: list[Route]) -> list[tuple[ScaleShift, BatchFolded | None]]:
        """Per route: the BN's (s, t) with the looked-through biases, and for a backward fold into
        a small Conv its folded (weight, bias) or FoldValueError; all computed in batches."""
        st = self._scale_shift(routes)
        for k, r in enumerate(routes):
            if r.add_consts:
                s, t = st[k]
                for extra in r.add_consts:  # s*(z + c) + t = s*z + (s*c + t)
                    t = t + s * extra
                st[k] = (s, t)
        folded = self._small_convs(routes, st)
        return list(zip(st, folded))

    def _scale_shift(self, routes: list[Route]) -> list[ScaleShift]:
        nodes, inits = self.index.nodes, self.index.initializers
        params = [self.index.ins[r.bn_pos][1:5] for r in routes]
        read = [raw_values(inits, [p[j] for p in params], rank=1) for j in range(4)] if params else []
        cols = [c for c in read if c is not None]
        if len(cols) == 4 and cols[0][1] == cols[1][1] == cols[2][1] == cols[3][1]:
            lengths = cols[0][1]
            eps = np.repeat(np.array([r.eps for r in routes], dtype=np.float64), lengths)
            st = scale_shift_flat(cols[0][0], cols[1][0], cols[2][0], cols[3][0], eps)
            if st is not None:
                s, t = st
                return [(s[a:b], t[a:b]) for a, b in bounds(lengths)]
        # parameters that are not plain raw initializers, or a bad variance (arith names it)
        return scale_shift_many([self.bn_params(nodes[r.bn_pos], r.eps) for r in routes])

    def _small_convs(self, routes: list[Route], st: list[ScaleShift]) -> list[BatchFolded | None]:
        """Folded (weight, bias) of backward folds into Convs with small initializer weights, all
        computed by the Conv rule's ``fold_cast_many``; None for every other route (``backward``
        folds those itself, so that only one large folded weight is alive at a time)."""
        nodes, inits, all_ins = self.index.nodes, self.index.initializers, self.index.ins
        folded: list[BatchFolded | None] = [None] * len(routes)
        picked: list[int] = []
        specs: list[ConvSpec] = []
        weights: list[str] = []
        biases: list[str] = []  # "" for none
        limit = batched.BATCH_ELEMENTS // 4
        # a Conv that takes two folds (a BN before it forward, one after it backward) must see the
        # first fold's weights when the second is computed: those are folded in ``backward``
        targets = Counter(r.target_pos for r in routes)
        for k, r in enumerate(routes):
            pos = r.target_pos
            if r.direction != "backward" or targets[pos] > 1 or RULES.get(nodes[pos].op_type) is not CONV:
                continue
            ins = all_ins[pos]
            w = inits.get(ins[1])
            if w is None:
                continue
            shape = tuple(w.dims)
            s, t = st[k]
            if len(shape) < 3 or not shape[0] or math.prod(shape) > limit or s.shape != (shape[0],):
                continue
            b_name = ins[2] if len(ins) > 2 else ""
            b = inits.get(b_name) if b_name else None
            if b_name and b is None:
                continue
            picked.append(k)
            specs.append(ConvSpec(shape, _FLOATS.get(w.data_type), b is not None,
                                  None if b is None else _FLOATS.get(b.data_type), s, t))
            weights.append(ins[1])
            biases.append(b_name)
        for k, res in zip(picked, CONV.fold_cast_many(specs, _InitConvs(self, specs, weights, biases))):
            folded[k] = res
        return folded

    # ---- writing parameters --------------------------------------------------------------
    def write_param(self, pos: int, slot: int, array: np.ndarray | RawValue, label: str) -> None:
        """Give input ``slot`` of node ``pos`` the value ``array``: in place where this node is the
        initializer's only reader, else as a new initializer."""
        idx = self.index
        ins = idx.ins[pos]
        old = ins[slot] if slot < len(ins) else ""
        init = idx.initializers.get(old) if old else None
        if init is not None and idx.use_count(old) == 1:  # only this node reads it (no graph output)
            if isinstance(array, RawValue):
                # folded from this initializer's raw data (dtype and shape as read by ``raw_values``):
                # only the bytes change, as ``array_to_tensor`` would do unless it has a segment
                if not init.HasField("segment"):
                    init.raw_data = array.data
                    return
                array = array.array()
            array_to_tensor(array, old, into=init)
            return
        if isinstance(array, RawValue):
            array = array.array()
        name = idx.fresh_name(f"{idx.nodes[pos].name}.{label}")
        idx.add_initializer(array_to_tensor(array, name))
        idx.set_input(pos, slot, name)
        if old:
            idx.remove_dead_producers(old)

    def remove_bn(self, bn_pos: int) -> None:
        idx = self.index
        params = idx.remove_node(bn_pos)[1:]
        inits, readers, outputs = idx.initializers, idx.readers, idx.graph_outputs
        for name in params:
            if name in inits and not readers(name) and name not in outputs:
                idx.dropped_initializers.add(name)  # the common case of remove_dead_producers
            elif name:
                idx.remove_dead_producers(name)

    # ---- backward ------------------------------------------------------------------------
    def backward(self, route: Route, st: ScaleShift, folded: BatchFolded | None) -> None:
        idx = self.index
        p = idx.nodes[route.target_pos]
        rule = RULES[p.op_type]
        if folded is None:  # not batched in ``precompute``
            w = self.weight(p.input[1])
            b = self.value(p.input[2] if len(p.input) > 2 and p.input[2] else None)
            folded = rule.fold_cast(w, b, *st, rule.attrs(p))
        if isinstance(folded, arith.FoldValueError):
            raise folded
        if not self.commit:
            return
        # a batched Conv fold is written as the raw bytes of its share of the batch
        w_out, b_out = folded.raw() if isinstance(folded, BatchShare) else folded
        self.write_param(route.target_pos, 1, w_out, "weight_folded")
        if rule.bias_slot is None:  # the bias becomes an Add after the producer (never batched)
            assert isinstance(b_out, np.ndarray)
            self._rewire_chain(route, bias=b_out)
            return
        self.write_param(route.target_pos, rule.bias_slot, b_out, "bias_folded")
        rule.finish(p)
        self._rewire_chain(route, bias=None)

    def _rewire_chain(self, route: Route, bias: np.ndarray | None) -> None:
        """Drop the BN and the Adds it looked through; the last kept node writes the BN's output."""
        idx = self.index
        bn = idx.nodes[route.bn_pos]
        y = idx.outs[route.bn_pos][0]
        kept = [(route.target_pos, 0)]
        if route.chain:
            for pos, slot in reversed(route.chain):
                node = idx.nodes[pos]
                if node.op_type == "Add":
                    const = node.input[1 - slot]
                    idx.remove_node(pos)
                    idx.remove_dead_producers(const)
                else:
                    kept.append((pos, slot))
            for (prev, _), (pos, slot) in pairwise(kept):
                idx.set_input(pos, slot, idx.outs[prev][0])
        last = kept[-1][0]
        self.remove_bn(route.bn_pos)
        if bias is None:
            idx.set_output(last, 0, y)
            return
        shape = (bias.shape[0],) + (1,) * (route.out_rank - 2)
        name = idx.fresh_name(f"{idx.nodes[route.target_pos].name}.bias_folded")
        idx.add_initializer(array_to_tensor(bias.reshape(shape), name))
        add = helper.make_node("Add", [idx.nodes[last].output[0], name], [y],
                               name=idx.fresh_node_name(f"{bn.name}.folded_bias"))
        idx.insert_node(route.bn_pos, add)

    # ---- forward -------------------------------------------------------------------------
    def forward(self, route: Route, st: ScaleShift, folded: BatchFolded | None = None) -> None:
        idx = self.index
        bn = idx.nodes[route.bn_pos]
        conv = idx.nodes[route.target_pos]
        w = self.weight(conv.input[1])
        b = self.value(conv.input[2] if len(conv.input) > 2 and conv.input[2] else None)
        w_out, b_out = FORWARD.fold_cast(w, b, *st, FORWARD.attrs(conv))
        if not self.commit:
            return
        self.write_param(route.target_pos, 1, w_out, "weight_folded")
        self.write_param(route.target_pos, 2, b_out, "bias_folded")
        x = bn.input[0]
        self.remove_bn(route.bn_pos)
        idx.set_input(route.target_pos, 0, x)


def apply_plan(work: Work, plan: FoldPlan, routes: dict[str, Route], *, commit: bool = True) -> FoldPlan:
    """Carry out the plan's folds and commit them (or, with ``commit=False``, only check their
    arithmetic and leave the graph as it was).

    Returns the final plan: folds whose values do not fit the dtype become FROZEN_KEPT.
    """
    applier = _Applier(work.index, work.consts, commit)
    todo = [(d, routes[d.bn]) for d in plan.decisions if d.action is Action.FOLDED and d.bn in routes]
    values = dict(zip((d.bn for d, _ in todo), applier.precompute([r for _, r in todo])))
    final: list[FoldDecision] = []
    for d in plan.decisions:
        route = routes.get(d.bn)
        if d.action is not Action.FOLDED or route is None:
            final.append(d)
            continue
        try:
            (applier.backward if route.direction == "backward" else applier.forward)(route, *values[d.bn])
        except arith.FoldValueError as exc:
            final.append(FoldDecision(d.bn, Action.FROZEN_KEPT, reason=Reason.DTYPE_OVERFLOW,
                                      detail=f"folding into '{d.target}' would {exc.kind} the weight dtype"))
            continue
        final.append(d)
    if commit:
        work.commit()
    return FoldPlan(tuple(final))
