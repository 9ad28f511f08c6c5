"""Backward fold into a Conv: weight ``(C_out, C_in/groups, k...)``, any rank and group count."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from bnfold.formulas import arith, batched
from bnfold.formulas.batched import BatchFolded, ConvSpec, ConvValues
from bnfold.rules.base import BackwardRule, FoldAttrs, GraphView, Match


class ConvRule(BackwardRule):
    op_type = "Conv"

    def match(self, node: onnx.NodeProto, ins: list[str], graph: GraphView) -> Match:
        w = self.conv_weight(node, ins, graph)
        return Match(self.out_channels(w, FoldAttrs()), len(w))

    def out_channels(self, weight_shape: tuple[int, ...], attrs: FoldAttrs) -> int:
        return int(weight_shape[0])  # output channel o is weight[o], whatever the group count

    def fold(self, weight: np.ndarray, bias: np.ndarray | None, s: np.ndarray, t: np.ndarray,
             attrs: FoldAttrs) -> tuple[np.ndarray, np.ndarray]:
        return arith.fold_conv(weight, bias, s, t)

    def fold_cast(self, weight: np.ndarray, bias: np.ndarray | None, s: np.ndarray, t: np.ndarray,
                  attrs: FoldAttrs) -> tuple[np.ndarray, np.ndarray]:
        # the same values and errors as fold + cast_back, a block of output channels at a time
        return arith.fold_conv_cast(weight, bias, s, t)

    def fold_cast_many(self, specs: Sequence[ConvSpec], values: ConvValues) -> list[BatchFolded]:
        """``fold_cast`` of many Convs at once: small ones from their weights and biases read flat
        and concatenated (``batched.fold_convs``: bit for bit the one-at-a-time values), the others
        one at a time. A FoldValueError is returned in its fold's place."""
        return batched.fold_convs(specs, values)


CONV = ConvRule()
