"""Backward fold into a ConvTranspose: weight ``(C_in, C_out/groups, k...)``; each group's slice
of axis 1 holds that group's output channels."""
from __future__ import annotations

import numpy as np
import onnx

from bnfold.formulas import arith
from bnfold.graph.attrs import get_attr
from bnfold.records import Reason
from bnfold.rules.base import BackwardRule, FoldAttrs, GraphView, Match, Refuse


class ConvTransposeRule(BackwardRule):
    op_type = "ConvTranspose"

    def match(self, node: onnx.NodeProto, ins: list[str], graph: GraphView) -> Match:
        w = self.conv_weight(node, ins, graph)
        attrs = self.attrs(node)
        if not arith.groups_divide(attrs.group, w[0]):  # an invalid node: onnxruntime refuses it too
            raise Refuse(Reason.CHANNEL_MISMATCH, f"ConvTranspose '{node.name}' has group={attrs.group}, which does "
                                                  f"not divide its {w[0]} input channels")
        return Match(self.out_channels(w, attrs), len(w))

    def attrs(self, node: onnx.NodeProto) -> FoldAttrs:
        return FoldAttrs(group=int(get_attr(node, "group", 1)))

    def out_channels(self, weight_shape: tuple[int, ...], attrs: FoldAttrs) -> int:
        return int(weight_shape[1]) * attrs.group

    def fold(self, weight: np.ndarray, bias: np.ndarray | None, s: np.ndarray, t: np.ndarray,
             attrs: FoldAttrs) -> tuple[np.ndarray, np.ndarray]:
        return arith.fold_conv_transpose(weight, bias, s, t, attrs.group)


CONV_TRANSPOSE = ConvTransposeRule()
