"""Backward fold into ``x @ W`` with a constant ``(K, N)`` W on the right and a rank-2 x: the
folded bias becomes an Add after the MatMul."""
from __future__ import annotations

import numpy as np
import onnx

from bnfold.formulas import arith
from bnfold.records import Reason
from bnfold.rules.base import BackwardRule, FoldAttrs, GraphView, Match, Refuse


class MatMulRule(BackwardRule):
    op_type = "MatMul"
    bias_slot = None

    def match(self, node: onnx.NodeProto, ins: list[str], graph: GraphView) -> Match:
        if graph.is_constant(node.input[0]) and not graph.is_constant(node.input[1]):
            raise Refuse(Reason.UNSUPPORTED_PRODUCER, f"MatMul '{node.name}' has its constant on the left")
        w = graph.require_const(node.input[1], "weight", node)
        graph.require_float(node.input[1], node)
        if len(w) != 2:
            raise Refuse(Reason.CHANNEL_MISMATCH, f"MatMul '{node.name}' weight has rank {len(w)}, not 2")
        a_rank = graph.rank(node.input[0])
        if a_rank is None:
            raise Refuse(Reason.UNKNOWN_RANK, f"rank of MatMul '{node.name}' input is unknown")
        if a_rank != 2:
            raise Refuse(Reason.CHANNEL_MISMATCH,
                         f"MatMul '{node.name}' output has rank {a_rank}: its columns are not on BN axis 1")
        return Match(self.out_channels(w, FoldAttrs()), 2)

    def out_channels(self, weight_shape: tuple[int, ...], attrs: FoldAttrs) -> int:
        return int(weight_shape[1])

    def fold(self, weight: np.ndarray, bias: np.ndarray | None, s: np.ndarray, t: np.ndarray,
             attrs: FoldAttrs) -> tuple[np.ndarray, np.ndarray]:
        return arith.fold_matmul(weight, bias, s, t)


MATMUL = MatMulRule()
