"""Stage 5: apply the plan. Arithmetic comes from ``arith`` (float64, pure); this module only
rewires nodes and writes tensors.

A weight is replaced in place only when this node is its sole reader; otherwise the folded node
gets its own copy (the original stays for the other readers). A folded value that does not fit
the weight's dtype cancels that fold: the BN stays, frozen, with DTYPE_OVERFLOW.
"""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import onnx
from onnx import helper

from bnfold.formulas import arith
from bnfold.formulas.batched import (
    BATCH_ELEMENTS,
    BnParams,
    ConvFold,
    bounds,
    fold_conv_flat,
    fold_conv_one,
    scale_shift_flat,
    scale_shift_many,
)
from bnfold.graph.attrs import get_attr, set_attr
from bnfold.graph.constants import Constants, array_to_tensor, raw_values, tensor_to_array
from bnfold.graph.index import GraphIndex
from bnfold.records import Action, FoldDecision, FoldPlan, Reason
from bnfold.stages.plan import Route
from bnfold.stages.work import Work


def _chunks(members: list, limit: int):
    """Consecutive runs of ``members`` whose weights (size last) hold at most ``limit`` values."""
    run: list = []
    total = 0
    for m in members:
        size = m[-1]
        if run and total + size > limit:
            yield run
            run, total = [], 0
        run.append(m)
        total += size
    if run:
        yield run


def _bias_original(b: np.ndarray | None, folded: np.ndarray) -> np.ndarray:
    """The bias before folding, shaped like the folded one (zeros where there was none).

    A folded bias that underflows where the old one was zero or absent is harmless; only a
    normal old value turning subnormal counts (math.md section 3).
    """
    if b is not None and b.size == folded.size:
        return b.reshape(folded.shape)
    return np.zeros_like(folded)


class _Raw:
    """A folded value as the raw bytes of the raw-data initializer it replaces (same dtype and
    shape): written in place without a numpy round trip."""

    __slots__ = ("data", "shape", "dtype")

    def __init__(self, data: bytes, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.data, self.shape, self.dtype = data, shape, dtype

    def array(self) -> np.ndarray:
        return np.frombuffer(self.data, dtype=self.dtype).reshape(self.shape)


class _RawFold:
    """One Conv's share of a batched fold: its folded weight and bias as raw bytes."""

    __slots__ = ("w", "b", "shape", "w_dtype", "b_dtype")

    def __init__(self, w: bytes, b: bytes, shape: tuple[int, ...], w_dtype: np.dtype, b_dtype: np.dtype) -> None:
        self.w, self.b, self.shape, self.w_dtype, self.b_dtype = w, b, shape, w_dtype, b_dtype

    def params(self) -> tuple[_Raw, _Raw]:
        return _Raw(self.w, self.shape, self.w_dtype), _Raw(self.b, (self.shape[0],), self.b_dtype)


class _Applier:
    def __init__(self, index: GraphIndex, consts: Constants, commit: bool) -> None:
        self.index, self.consts, self.commit = index, consts, commit

    def value(self, name: str | None) -> np.ndarray | None:
        return self.consts.value(name) if name else None

    def bn_params(self, bn: onnx.NodeProto, eps: float) -> BnParams:
        inits, value = self.index.initializers, self.consts.value
        vals = []
        for name in list(bn.input)[1:5]:
            t = inits.get(name)
            vals.append(tensor_to_array(t) if t is not None else value(name))
        return BnParams(*vals, eps)

    def precompute(self, routes: list[Route]) -> list[tuple[tuple[np.ndarray, np.ndarray], object]]:
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

    def _scale_shift(self, routes: list[Route]) -> list[tuple[np.ndarray, np.ndarray]]:
        nodes, inits = self.index.nodes, self.index.initializers
        params = [self.index.ins[r.bn_pos][1:5] for r in routes]
        cols = [raw_values(inits, [p[j] for p in params], rank=1) for j in range(4)] if params else [None]
        if all(c is not None for c in cols) and cols[0][1] == cols[1][1] == cols[2][1] == cols[3][1]:
            lengths = cols[0][1]
            eps = np.repeat(np.array([r.eps for r in routes], dtype=np.float64), lengths)
            st = scale_shift_flat(cols[0][0], cols[1][0], cols[2][0], cols[3][0], eps)
            if st is not None:
                s, t = st
                return [(s[a:b], t[a:b]) for a, b in bounds(lengths)]
        # parameters that are not plain raw initializers, or a bad variance (arith names it)
        return scale_shift_many([self.bn_params(nodes[r.bn_pos], r.eps) for r in routes])

    def _small_convs(self, routes: list[Route], st) -> list[object]:
        """Folded (weight, bias) of backward folds into Convs with small raw weights, in
        concatenated batches; None for every other route (``backward`` folds those itself, so that
        only one large folded weight is alive at a time)."""
        nodes, inits = self.index.nodes, self.index.initializers
        folded: list[object] = [None] * len(routes)
        groups: dict[tuple, list[tuple[int, str, str, tuple[int, ...]]]] = {}
        # a Conv that takes two folds (a BN before it forward, one after it backward) must see the
        # first fold's weights when the second is computed: those are folded in ``backward``
        targets = Counter(r.target_pos for r in routes)
        for k, r in enumerate(routes):
            p = nodes[r.target_pos]
            if r.direction != "backward" or targets[r.target_pos] > 1 or p.op_type != "Conv":
                continue
            ins = self.index.ins[r.target_pos]
            w = inits.get(ins[1])
            if w is None:
                continue
            shape = tuple(w.dims)
            size = math.prod(shape)
            if len(shape) < 3 or not shape[0] or size > BATCH_ELEMENTS // 4 or st[k][0].shape != (shape[0],):
                continue
            b_name = ins[2] if len(ins) > 2 else ""
            b = inits.get(b_name) if b_name else None
            if b_name and b is None:
                continue
            # one dtype pair and one size per output channel per batch: each batch is a matrix
            # of rows, one per output channel
            groups.setdefault((w.data_type, b.data_type if b is not None else None, size // shape[0]), []).append(
                (k, ins[1], b_name, shape, size))
        for members in groups.values():
            for chunk in _chunks(members, BATCH_ELEMENTS):
                self._fold_chunk(chunk, st, folded)
        return folded

    def _fold_chunk(self, chunk, st, folded: list[object]) -> None:
        inits = self.index.initializers
        ws = raw_values(inits, [w for _, w, _, _, _ in chunk])
        has_bias = bool(chunk[0][2])
        bs = raw_values(inits, [b for _, _, b, _, _ in chunk], rank=1) if has_bias else None
        couts = [shape[0] for _, _, _, shape, _ in chunk]
        if ws is None or ws[1] != [size for *_, size in chunk] or (has_bias and (bs is None or bs[1] != couts)):
            for k, w, b, _, _ in chunk:  # not plain raw data: one at a time
                folded[k] = fold_conv_one(ConvFold(self.value(w), self.value(b), *st[k]))
            return
        w_flat, sizes = ws
        s = np.concatenate([st[k][0] for k, *_ in chunk])
        t = np.concatenate([st[k][1] for k, *_ in chunk])
        b_orig = bs[0].astype(np.float64) if bs is not None else np.zeros(len(s))
        b_dtype = bs[0].dtype if bs is not None else w_flat.dtype
        try:
            w_out, b_out = fold_conv_flat(w_flat, np.repeat([n // c for n, c in zip(sizes, couts)], couts),
                                          s, t, b_orig, b_dtype)
        except arith.FoldValueError:  # which fold it is: one at a time
            for k, w, b, _, _ in chunk:
                folded[k] = fold_conv_one(ConvFold(self.value(w), self.value(b), *st[k]))
            return
        # raw bytes, cut per Conv: each has the dtype, shape and byte layout of the tensor it replaces
        w_raw, wi = w_out.tobytes(), w_out.itemsize
        b_raw, bi = b_out.tobytes(), b_out.itemsize
        for (k, _, _, shape, _), (a, b_), (c, d) in zip(chunk, bounds(sizes), bounds(couts)):
            folded[k] = _RawFold(w_raw[a * wi:b_ * wi], b_raw[c * bi:d * bi], shape, w_out.dtype, b_out.dtype)

    # ---- writing parameters --------------------------------------------------------------
    def write_param(self, pos: int, slot: int, array: "np.ndarray | _Raw", label: str) -> None:
        """Give input ``slot`` of node ``pos`` the value ``array``: in place where this node is the
        initializer's only reader, else as a new initializer."""
        idx = self.index
        ins = idx.ins[pos]
        old = ins[slot] if slot < len(ins) else ""
        init = idx.initializers.get(old) if old else None
        if init is not None and idx.use_count(old) == 1:  # only this node reads it (no graph output)
            if isinstance(array, _Raw):  # the initializer's own dtype and shape: only the bytes change
                init.raw_data = array.data
            else:
                array_to_tensor(array, old, into=init)
            return
        if isinstance(array, _Raw):
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
    def backward(self, route: Route, st: tuple[np.ndarray, np.ndarray], folded) -> None:
        idx = self.index
        p = idx.nodes[route.target_pos]
        op = p.op_type
        if op == "Conv":
            if folded is None:  # not batched in ``precompute``
                folded = fold_conv_one(ConvFold(self.value(p.input[1]), self.value(
                    p.input[2] if len(p.input) > 2 else ""), *st))
            if isinstance(folded, arith.FoldValueError):
                raise folded
            w_out, b_out = folded.params() if isinstance(folded, _RawFold) else folded
        else:
            w_out, b_out = self._backward_values(p, st)
        if not self.commit:
            return
        self.write_param(route.target_pos, 1, w_out, "weight_folded")
        if op == "MatMul":
            self._rewire_chain(route, bias=b_out)
            return
        self.write_param(route.target_pos, 2, b_out, "bias_folded")
        if op == "Gemm":
            set_attr(p, "beta", 1.0)
        self._rewire_chain(route, bias=None)

    def _backward_values(self, p: onnx.NodeProto, st: tuple[np.ndarray, np.ndarray]):
        s, t = st
        w = self.value(p.input[1])
        op = p.op_type
        bias_name = p.input[2] if len(p.input) > 2 and p.input[2] else None
        b = self.value(bias_name)
        if op == "ConvTranspose":
            w2, b2 = arith.fold_conv_transpose(w, b, s, t, int(get_attr(p, "group", 1)))
        elif op == "Gemm":
            w2, b2 = arith.fold_gemm(w, b, s, t, trans_b=bool(get_attr(p, "transB", 0)),
                                     alpha=float(get_attr(p, "alpha", 1.0)), beta=float(get_attr(p, "beta", 1.0)),
                                     n=s.shape[0])
        else:  # MatMul
            w2, b2 = arith.fold_matmul(w, None, s, t)
        w_out = arith.cast_back(w2, w.dtype, original=w)
        b_dtype = b.dtype if b is not None else w.dtype
        b_out = arith.cast_back(b2, b_dtype, original=_bias_original(b, b2))
        return w_out, b_out

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
            for (prev, _), (pos, slot) in zip(kept, kept[1:]):
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
    def forward(self, route: Route, st: tuple[np.ndarray, np.ndarray], folded=None) -> None:
        idx = self.index
        bn = idx.nodes[route.bn_pos]
        conv = idx.nodes[route.target_pos]
        s, t = st
        w = self.value(conv.input[1])
        bias_name = conv.input[2] if len(conv.input) > 2 and conv.input[2] else None
        b = self.value(bias_name)
        w2, b2 = arith.fold_forward_conv(w, b, s, t, int(get_attr(conv, "group", 1)))
        w_out = arith.cast_back(w2, w.dtype, original=w)
        b_out = arith.cast_back(b2, b.dtype if b is not None else w.dtype, original=_bias_original(b, b2))
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
