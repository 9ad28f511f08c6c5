"""Stage 4: decide, for every BN, whether and where it folds — without changing the graph.

Backward (into the producer) is tried first: the walk from the BN's input may pass through
nodes that keep channel c on axis 1 (an Add of a per-channel constant, Reshape/Squeeze/Unsqueeze
that leave axes 0 and 1 alone, Identity) and ends at a Conv, ConvTranspose, Gemm or MatMul with
constant weights. If that fails, forward into a following unpadded Conv (docs/math.md section 4).
What is specific to a producer kind (its attributes, weight layout, channel count, refusals) is
its rule in :mod:`bnfold.rules`; this module walks the graph (the look-through chain, fan-out,
constant parameters) and asks the rules. Each refusal names a Reason; nothing here mutates the
graph.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from bnfold.graph.attrs import get_attr
from bnfold.graph.constants import Constants
from bnfold.graph.index import GraphIndex
from bnfold.records import Action, Mode, Reason
from bnfold.rules import FORWARD, RULES, Refuse
from bnfold.run_records import FoldDecision, FoldPlan
from bnfold.stages.discover import BnSite
from bnfold.stages.work import Work

PRODUCERS = set(RULES)
LOOK_THROUGH = {"Add", "Reshape", "Squeeze", "Unsqueeze", "Identity"}
_MAX_CHAIN = 8
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                onnx.TensorProto.BFLOAT16}


@dataclass
class Route:
    """How to apply one fold; consumed by ``bnfold.stages.fold.apply_plan``."""

    bn_pos: int
    direction: str  # "backward" | "forward"
    target_pos: int
    chain: list[tuple[int, int]] = field(default_factory=list)  # (node pos, data slot), BN side first
    add_consts: list[np.ndarray] = field(default_factory=list)  # per-channel (C,) biases passed through
    out_rank: int = 2  # rank of the BN input
    eps: float = 1e-5  # the BN's epsilon


_PARAM_SLOTS = ((1, "scale"), (2, "bias"), (3, "mean"), (4, "variance"))


class Planner:
    """Decides every BN's fold; it is also the :class:`bnfold.rules.GraphView` the rules ask."""

    def __init__(self, index: GraphIndex, consts: Constants) -> None:
        self.index, self.consts = index, consts

    # ---- the rules' view of the graph ----------------------------------------------------
    def is_constant(self, name: str) -> bool:
        return self.consts.is_constant(name)

    def is_initializer(self, name: str) -> bool:
        """A constant initializer (an overridable one, also a graph input, is not constant)."""
        return name in self.index.initializers and name not in self.index.overridable

    def rank(self, name: str) -> int | None:
        return self.index.rank(name)

    def _shape_of(self, name: str) -> tuple[int, ...] | None:
        t = self.index.initializers.get(name) if name not in self.index.overridable else None
        if t is not None:
            return tuple(t.dims)
        v = self.consts.value(name)
        return None if v is None else tuple(v.shape)

    def require_const(self, name: str, what: str, node: onnx.NodeProto) -> tuple[int, ...]:
        shape = self._shape_of(name) if name else None
        if shape is None:
            named = f" ('{name}')" if name in self.index.overridable else ""
            raise Refuse(Reason.NOT_CONSTANT,
                         f"{what} of {node.op_type} '{node.name}'{named} {self._not_constant(name)}")
        return shape

    def _not_constant(self, name: str) -> str:
        if name in self.index.overridable:
            return "is a graph input: its initializer is only a default a caller may replace"
        dq = self._dequantized(name)
        if dq is not None:
            return (f"is not a constant: it is dequantized at run time by DequantizeLinear '{dq}' (a quantized "
                    "weight; fold the BNs before quantizing the model)")
        return "is not a constant"

    def _dequantized(self, name: str) -> str | None:
        """The DequantizeLinear node that computes ``name``, directly or through Identity / Cast /
        Reshape / Transpose / Unsqueeze steps (a QDQ model's weight), or None."""
        for _ in range(8):
            node = self.index.node_of(name)
            if node is None or not node.input:
                return None
            if node.op_type == "DequantizeLinear":
                return node.name or node.output[0]
            if node.op_type not in ("Identity", "Cast", "Reshape", "Transpose", "Unsqueeze"):
                return None
            name = node.input[0]
        return None

    def require_float(self, name: str, node: onnx.NodeProto) -> None:
        et = self.index.elem_type(name)
        if et is None:
            v = self.consts.value(name)
            if v is not None and v.dtype.kind != "f":
                et = -1
        if et is not None and et not in _FLOAT_TYPES:
            raise Refuse(Reason.UNSUPPORTED_DTYPE,
                         f"weight of {node.op_type} '{node.name}' is not floating point")

    # ---- the decision --------------------------------------------------------------------
    def decide(self, site: BnSite) -> tuple[FoldDecision, Route | None]:
        info = site.info
        if site.pos is None:
            return FoldDecision(info.name, Action.FROZEN_KEPT, reason=Reason.IN_SUBGRAPH,
                                detail=f"inside {info.graph_path}; bnfold folds main-graph BN only"), None
        if not site.spatial:
            return FoldDecision(info.name, Action.FROZEN_KEPT, reason=Reason.SPATIAL_ZERO,
                                detail="spatial=0: statistics per activation, not per channel"), None
        bn = self.index.nodes[site.pos]
        ins = self.index.ins[site.pos]
        # statistics of a training-mode BN become constants when it is frozen
        slots = _PARAM_SLOTS if info.mode is Mode.INFERENCE else _PARAM_SLOTS[:2]
        is_constant = self.consts.is_constant  # an overridable initializer is not constant
        for slot, what in slots:
            if not is_constant(ins[slot]):
                return FoldDecision(info.name, Action.FROZEN_KEPT, reason=Reason.NOT_CONSTANT,
                                    detail=f"BN {what} '{ins[slot]}' {self._not_constant(ins[slot])}"), None
        channels = info.channels  # from the BN's parameters, read by discovery
        try:
            route = self._backward(site.pos, bn, channels)
            route.eps = info.epsilon
            p = self.index.nodes[route.target_pos]
            through = tuple(self.index.nodes[pos].name for pos, _ in reversed(route.chain)) if route.chain else ()
            return FoldDecision(info.name, Action.FOLDED, target=p.name, direction="backward",
                                reason=self._clone_note(route.target_pos),
                                detail=f"into {p.op_type} '{p.name}'", through=through), route
        except Refuse as back:
            try:
                route = self._forward(site.pos, bn, channels)
                route.eps = info.epsilon
            except _NoCandidate:
                return FoldDecision(info.name, Action.FROZEN_KEPT, reason=back.reason,
                                    detail=back.detail), None
            except Refuse as fwd:
                if back.reason in (Reason.NO_PRODUCER, Reason.UNSUPPORTED_PRODUCER):
                    return FoldDecision(info.name, Action.FROZEN_KEPT, reason=fwd.reason,
                                        detail=f"{fwd.detail}; backward: {back.detail}"), None
                return FoldDecision(info.name, Action.FROZEN_KEPT, reason=back.reason,
                                    detail=f"{back.detail}; forward: {fwd.detail}"), None
            c = self.index.nodes[route.target_pos]
            return FoldDecision(info.name, Action.FOLDED, target=c.name, direction="forward",
                                reason=self._clone_note(route.target_pos),
                                detail=f"into the following {c.op_type} '{c.name}' (backward: {back.detail})"), route

    def _clone_note(self, pos: int) -> Reason | None:
        use_count = self.index.use_count
        ins = self.index.ins[pos]
        shared = use_count(ins[1]) > 1 or (len(ins) > 2 and bool(ins[2]) and use_count(ins[2]) > 1)
        return Reason.SHARED_WEIGHT_CLONED if shared else None

    # ---- backward ------------------------------------------------------------------------
    def _backward(self, bn_pos: int, bn: onnx.NodeProto, channels: int | None) -> Route:
        idx = self.index
        cur = x = idx.ins[bn_pos][0]
        chain: list[tuple[int, int]] = []
        while True:
            if idx.use_count(cur) != 1:
                where = "a graph output" if cur in idx.graph_outputs else f"{idx.use_count(cur)} readers"
                raise Refuse(Reason.PRODUCER_FANOUT,
                             f"tensor '{cur}' between producer and BN is also read elsewhere ({where})")
            pos = idx.producer.get(cur)
            if pos is None or pos in idx.removed:
                kind = "a constant" if self.consts.is_constant(cur) else "a graph input"
                raise Refuse(Reason.NO_PRODUCER, f"input '{cur}' is {kind}")
            node = idx.nodes[pos]
            op = node.op_type
            if node.domain not in ("", "ai.onnx"):
                raise Refuse(Reason.UNSUPPORTED_PRODUCER, f"input comes from {node.domain}.{op} '{node.name}'")
            if op in PRODUCERS:
                break
            if op in LOOK_THROUGH and len(chain) < _MAX_CHAIN:
                slot = self._data_slot(node)
                chain.append((pos, slot))
                cur = idx.ins[pos][slot]
                continue
            raise Refuse(Reason.UNSUPPORTED_PRODUCER, f"input comes from {node.op_type} '{node.name}'")
        match = RULES[op].match(node, list(idx.ins[pos]), self)
        out_channels, rank = match.out_channels, match.rank
        if channels is not None and out_channels != channels:
            raise Refuse(Reason.CHANNEL_MISMATCH,
                         f"{node.op_type} '{node.name}' has {out_channels} output channels, BN has {channels}")
        route = Route(bn_pos, "backward", pos, chain)
        for cpos, slot in reversed(chain):  # from the producer toward the BN
            rank = self._through(idx.nodes[cpos], slot, rank, out_channels, route)
        bn_rank = idx.rank(x)
        if bn_rank is not None and bn_rank != rank:
            raise Refuse(Reason.CHANNEL_MISMATCH, f"rank {rank} after the look-through nodes, BN input has {bn_rank}")
        route.out_rank = rank
        return route

    def _data_slot(self, node: onnx.NodeProto) -> int:
        if node.op_type == "Add":
            const = [self.consts.is_constant(i) for i in node.input[:2]]
            if const.count(True) != 1:
                given = [i for i in node.input[:2] if i in self.index.overridable]
                if given and not any(const):  # a bias the caller may replace: not a constant to fold
                    raise Refuse(Reason.NOT_CONSTANT, f"bias of Add '{node.name}' ('{given[0]}') "
                                 f"{self._not_constant(given[0])}")
                raise Refuse(Reason.UNSUPPORTED_PRODUCER,
                             f"input comes from Add '{node.name}' of two computed tensors")
            return const.index(False)
        for extra in node.input[1:]:
            if extra and not self.consts.is_constant(extra):
                raise Refuse(Reason.NOT_CONSTANT, f"{node.op_type} '{node.name}' has a computed shape/axes input")
        return 0

    def _checked_value(self, name: str) -> np.ndarray:
        """The value of an input that :meth:`_data_slot` has checked to be constant."""
        v = self.consts.value(name)
        assert v is not None, f"'{name}' was checked constant"
        return v

    def _through(self, node: onnx.NodeProto, slot: int, rank: int, c: int, route: Route) -> int:
        """Check that ``node`` keeps channel c on axis 1; return the rank after it."""
        op = node.op_type
        if op == "Identity":
            return rank
        if op == "Add":
            v = self._checked_value(node.input[1 - slot])
            if v.ndim > rank:
                raise Refuse(Reason.CHANNEL_MISMATCH, f"Add '{node.name}' broadcasts to a higher rank")
            full = (1,) * (rank - v.ndim) + tuple(v.shape)
            if any(d != 1 for i, d in enumerate(full) if i != 1) or full[1] not in (1, c):
                raise Refuse(Reason.CHANNEL_MISMATCH,
                             f"Add '{node.name}' constant of shape {list(v.shape)} is not per channel")
            route.add_consts.append(np.broadcast_to(v.reshape(full[1]).astype(np.float64), (c,)).copy())
            return rank
        if op in ("Squeeze", "Unsqueeze"):
            axes = node.input[1] if len(node.input) > 1 and node.input[1] else None
            ax = [int(a) for a in self._checked_value(axes).reshape(-1)] if axes else get_attr(node, "axes")
            if ax is None:
                raise Refuse(Reason.UNKNOWN_RANK, f"{op} '{node.name}' has no axes")
            new_rank = rank + len(ax) if op == "Unsqueeze" else rank - len(ax)
            ref = new_rank if op == "Unsqueeze" else rank
            if any(a % ref < 2 for a in ax) or new_rank < 2:
                raise Refuse(Reason.CHANNEL_MISMATCH, f"{op} '{node.name}' touches axis 0 or 1")
            return new_rank
        # Reshape
        shape = [int(s) for s in self._checked_value(node.input[1]).reshape(-1)]
        allowzero = bool(get_attr(node, "allowzero", 0))
        ok = len(shape) >= 2 and shape[1] == c
        if ok and shape[0] == 0 and not allowzero:
            pass  # batch axis copied
        elif ok and rank == 2 and -1 not in shape[1:] and int(np.prod(shape[1:])) == c and shape[0] in (-1,):
            pass  # (N, C) -> (N, C, 1, ...)
        else:
            in_shape = self.index.shape(node.input[0])
            if not (ok and in_shape and in_shape[0] is not None and shape[0] == in_shape[0]):
                raise Refuse(Reason.CHANNEL_MISMATCH,
                             f"Reshape '{node.name}' to {shape} may move the channel axis")
        return len(shape)

    # ---- forward -------------------------------------------------------------------------
    def _forward(self, bn_pos: int, bn: onnx.NodeProto, channels: int | None) -> Route:
        idx = self.index
        y = bn.output[0]
        readers = idx.consumer_nodes(y)
        convs = [p for p in readers if idx.nodes[p].op_type == "Conv" and idx.nodes[p].domain in ("", "ai.onnx")]
        if not convs:
            raise _NoCandidate
        if len(readers) != 1 or y in idx.graph_outputs:
            raise Refuse(Reason.BN_OUTPUT_FANOUT, f"BN output '{y}' is read by {idx.use_count(y)} consumers")
        pos = convs[0]
        conv = idx.nodes[pos]
        if list(conv.input).count(y) != 1 or conv.input[0] != y:
            raise Refuse(Reason.UNSUPPORTED_PRODUCER, f"BN output feeds Conv '{conv.name}' as a parameter")
        match = FORWARD.match(conv, self, channels)
        return Route(bn_pos, "forward", pos, out_rank=match.rank)


class _NoCandidate(Exception):
    """No Conv follows the BN, so no forward fold was even a candidate."""


def make_plan(work: Work) -> tuple[FoldPlan, dict[str, Route]]:
    """One decision for every BN of ``work`` (and the route of each fold); the graph is not changed."""
    planner = Planner(work.index, work.consts)
    decisions: list[FoldDecision] = []
    routes: dict[str, Route] = {}
    for site in work.sites:
        decision, route = planner.decide(site)
        decisions.append(decision)
        if route is not None:
            routes[decision.bn] = route
    return FoldPlan(tuple(decisions)), routes
