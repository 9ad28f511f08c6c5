"""Stage 5: apply the plan. Arithmetic comes from ``arith`` (float64, pure); this module only
rewires nodes and writes tensors.

A weight is replaced in place only when this node is its sole reader; otherwise the folded node
gets its own copy (the original stays for the other readers). A folded value that does not fit
the weight's dtype cancels that fold: the BN stays, frozen, with DTYPE_OVERFLOW.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ..graph.constants import Constants, array_to_tensor
from ..graph.index import GraphIndex
from ..plan import Route
from ..records import Action, FoldDecision, FoldPlan, Reason
from . import arith


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _set_attr(node: onnx.NodeProto, name: str, value) -> None:
    keep = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(keep)
    node.attribute.append(helper.make_attribute(name, value))


def _bias_original(b: np.ndarray | None, folded: np.ndarray) -> np.ndarray:
    """The bias before folding, shaped like the folded one (zeros where there was none).

    A folded bias that underflows where the old one was zero or absent is harmless; only a
    normal old value turning subnormal counts (math.md section 3).
    """
    if b is not None and b.size == folded.size:
        return b.reshape(folded.shape)
    return np.zeros_like(folded)


class _Applier:
    def __init__(self, index: GraphIndex, consts: Constants, commit: bool) -> None:
        self.index, self.consts, self.commit = index, consts, commit

    def value(self, name: str | None) -> np.ndarray | None:
        return self.consts.value(name) if name else None

    def bn_params(self, bn: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray]:
        gamma, beta, mean, var = (self.value(bn.input[i]) for i in (1, 2, 3, 4))
        return arith.bn_scale_shift(gamma, beta, mean, var, float(_attr(bn, "epsilon", 1e-5)))

    # ---- writing parameters --------------------------------------------------------------
    def write_param(self, pos: int, slot: int, array: np.ndarray, label: str) -> None:
        idx = self.index
        node = idx.nodes[pos]
        old = node.input[slot] if slot < len(node.input) else ""
        in_place = old in idx.initializers and idx.use_count(old) == 1 and old not in idx.graph_outputs
        if in_place:
            array_to_tensor(array, old, into=idx.initializers[old])
            return
        name = idx.fresh_name(f"{node.name}.{label}")
        idx.add_initializer(array_to_tensor(array, name))
        idx.set_input(pos, slot, name)
        if old:
            idx.remove_dead_producers(old)

    def remove_bn(self, bn_pos: int) -> None:
        idx = self.index
        bn = idx.nodes[bn_pos]
        params = [i for i in bn.input[1:] if i]
        idx.remove_node(bn_pos)
        for name in params:
            idx.remove_dead_producers(name)

    # ---- backward ------------------------------------------------------------------------
    def backward(self, route: Route) -> None:
        idx = self.index
        bn = idx.nodes[route.bn_pos]
        p = idx.nodes[route.target_pos]
        s, t = self.bn_params(bn)
        for extra in route.add_consts:  # s*(z + c) + t = s*z + (s*c + t)
            t = t + s * extra
        w = self.value(p.input[1])
        op = p.op_type
        bias_name = p.input[2] if len(p.input) > 2 and p.input[2] else None
        b = self.value(bias_name)
        if op == "Conv":
            w2, b2 = arith.fold_conv(w, b, s, t)
        elif op == "ConvTranspose":
            w2, b2 = arith.fold_conv_transpose(w, b, s, t, int(_attr(p, "group", 1)))
        elif op == "Gemm":
            w2, b2 = arith.fold_gemm(w, b, s, t, trans_b=bool(_attr(p, "transB", 0)),
                                     alpha=float(_attr(p, "alpha", 1.0)), beta=float(_attr(p, "beta", 1.0)),
                                     n=s.shape[0])
        else:  # MatMul
            w2, b2 = arith.fold_matmul(w, None, s, t)
        w_out = arith.cast_back(w2, w.dtype, original=w)
        b_dtype = b.dtype if b is not None else w.dtype
        b_out = arith.cast_back(b2, b_dtype, original=_bias_original(b, b2))
        if not self.commit:
            return
        self.write_param(route.target_pos, 1, w_out, "weight_folded")
        if op == "MatMul":
            self._rewire_chain(route, bias=b_out)
            return
        self.write_param(route.target_pos, 2, b_out, "bias_folded")
        if op == "Gemm":
            _set_attr(p, "beta", 1.0)
        self._rewire_chain(route, bias=None)

    def _rewire_chain(self, route: Route, bias: np.ndarray | None) -> None:
        """Drop the BN and the Adds it looked through; the last kept node writes the BN's output."""
        idx = self.index
        bn = idx.nodes[route.bn_pos]
        y = bn.output[0]
        kept = [(route.target_pos, 0)]
        for pos, slot in reversed(route.chain):
            node = idx.nodes[pos]
            if node.op_type == "Add":
                const = node.input[1 - slot]
                idx.remove_node(pos)
                idx.remove_dead_producers(const)
            else:
                kept.append((pos, slot))
        for (prev, _), (pos, slot) in zip(kept, kept[1:]):
            idx.set_input(pos, slot, idx.nodes[prev].output[0])
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
    def forward(self, route: Route) -> None:
        idx = self.index
        bn = idx.nodes[route.bn_pos]
        conv = idx.nodes[route.target_pos]
        s, t = self.bn_params(bn)
        w = self.value(conv.input[1])
        bias_name = conv.input[2] if len(conv.input) > 2 and conv.input[2] else None
        b = self.value(bias_name)
        w2, b2 = arith.fold_forward_conv(w, b, s, t, int(_attr(conv, "group", 1)))
        w_out = arith.cast_back(w2, w.dtype, original=w)
        b_out = arith.cast_back(b2, b.dtype if b is not None else w.dtype, original=_bias_original(b, b2))
        if not self.commit:
            return
        self.write_param(route.target_pos, 1, w_out, "weight_folded")
        self.write_param(route.target_pos, 2, b_out, "bias_folded")
        x = bn.input[0]
        self.remove_bn(route.bn_pos)
        idx.set_input(route.target_pos, 0, x)


def apply_plan(
    index: GraphIndex, consts: Constants, plan: FoldPlan, routes: dict[str, Route], *, commit: bool = True
) -> FoldPlan:
    """Carry out the plan's folds (or, with ``commit=False``, only check their arithmetic).

    Returns the final plan: folds whose values do not fit the dtype become FROZEN_KEPT.
    """
    applier = _Applier(index, consts, commit)
    final: list[FoldDecision] = []
    for d in plan.decisions:
        route = routes.get(d.bn)
        if d.action is not Action.FOLDED or route is None:
            final.append(d)
            continue
        try:
            (applier.backward if route.direction == "backward" else applier.forward)(route)
        except arith.FoldValueError as exc:
            final.append(FoldDecision(d.bn, Action.FROZEN_KEPT, reason=Reason.DTYPE_OVERFLOW,
                                      detail=f"folding into '{d.target}' would {exc.kind} the weight dtype"))
            continue
        final.append(d)
    return FoldPlan(tuple(final))
