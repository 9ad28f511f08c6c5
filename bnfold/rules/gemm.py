"""Backward fold into ``Y = alpha * A @ op(B) + beta * C`` (a torch ``Linear`` is this with
transB=1): B keeps its layout, the folded node has beta = 1."""
from __future__ import annotations

import numpy as np
import onnx

from bnfold.formulas import arith
from bnfold.graph.attrs import get_attr, set_attr
from bnfold.records import Reason
from bnfold.rules.base import BackwardRule, FoldAttrs, GraphView, Match, Refuse


class GemmRule(BackwardRule):
    op_type = "Gemm"

    def match(self, node: onnx.NodeProto, ins: list[str], graph: GraphView) -> Match:
        b = graph.require_const(node.input[1], "B", node)
        graph.require_float(node.input[1], node)
        n = self.out_channels(b, self.attrs(node))
        if len(node.input) > 2 and node.input[2]:
            c = graph.require_const(node.input[2], "C", node)
            if not (len(c) <= 2 and int(np.prod(c)) in (1, n) and (len(c) < 2 or c[0] == 1)):
                raise Refuse(Reason.CHANNEL_MISMATCH, f"Gemm '{node.name}' C of shape {list(c)} is not per column")
        return Match(n, 2)

    def attrs(self, node: onnx.NodeProto) -> FoldAttrs:
        return FoldAttrs(trans_b=bool(get_attr(node, "transB", 0)), alpha=float(get_attr(node, "alpha", 1.0)),
                         beta=float(get_attr(node, "beta", 1.0)))

    def out_channels(self, weight_shape: tuple[int, ...], attrs: FoldAttrs) -> int:
        return int(weight_shape[0] if attrs.trans_b else weight_shape[1])

    def fold(self, weight: np.ndarray, bias: np.ndarray | None, s: np.ndarray, t: np.ndarray,
             attrs: FoldAttrs) -> tuple[np.ndarray, np.ndarray]:
        return arith.fold_gemm(weight, bias, s, t, trans_b=attrs.trans_b, alpha=attrs.alpha, beta=attrs.beta,
                               n=s.shape[0])

    def finish(self, node: onnx.NodeProto) -> None:
        set_attr(node, "beta", 1.0)  # C' = beta*s*C + t already holds the old beta


GEMM = GemmRule()
