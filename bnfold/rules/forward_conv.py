"""Forward fold of a BN into the unpadded Conv that reads its output (docs/math.md section 4).

The planner finds the Conv (the BN output's only reader, as its data input); this rule checks
what is specific to the Conv and computes the folded tensors.
"""
from __future__ import annotations

import numpy as np
import onnx

from bnfold.formulas import arith
from bnfold.graph.attrs import get_attr
from bnfold.records import Reason
from bnfold.rules.base import FoldAttrs, GraphView, Match, Refuse, bias_original


class ForwardConvRule:
    op_type = "Conv"

    def match(self, conv: onnx.NodeProto, graph: GraphView, channels: int | None) -> Match:
        """The Conv's rank if it can take the BN on its ``channels`` input channels."""
        pads = get_attr(conv, "pads")
        auto_pad = get_attr(conv, "auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        if (pads and any(int(p) for p in pads)) or (auto_pad in ("SAME_UPPER", "SAME_LOWER")
                                                    and not self._same_pads_nothing(conv, graph)):
            raise Refuse(Reason.PADDED_FORWARD_FOLD,
                         f"following Conv '{conv.name}' pads its input (zeros, not the BN shift)")
        w = graph.require_const(conv.input[1], "weight", conv)
        if len(conv.input) > 2 and conv.input[2]:
            graph.require_const(conv.input[2], "bias", conv)
        graph.require_float(conv.input[1], conv)
        attrs = self.attrs(conv)
        if not arith.groups_divide(attrs.group, w[0]):  # an invalid node: onnxruntime refuses it too
            raise Refuse(Reason.CHANNEL_MISMATCH, f"Conv '{conv.name}' has group={attrs.group}, which does not "
                                                  f"divide its {w[0]} output channels")
        c_in = self.in_channels(w, attrs)
        if channels is not None and c_in != channels:
            raise Refuse(Reason.CHANNEL_MISMATCH, f"Conv '{conv.name}' takes {c_in} channels, BN has {channels}")
        return Match(c_in, len(w))

    @staticmethod
    def _same_pads_nothing(conv: onnx.NodeProto, graph: GraphView) -> bool:
        """Whether ``auto_pad=SAME_*`` adds no padding whatever the input size: a 1x...x1 kernel at
        stride 1 (the total pad per axis is (ceil(in/stride) - 1) * stride + (k - 1) * dilation + 1 - in)."""
        kernel = get_attr(conv, "kernel_shape")
        if not kernel:
            try:
                kernel = graph.require_const(conv.input[1], "weight", conv)[2:]
            except Refuse:
                return False
        strides = get_attr(conv, "strides") or [1] * len(kernel)
        return all(int(k) == 1 for k in kernel) and all(int(st) == 1 for st in strides)

    def attrs(self, node: onnx.NodeProto) -> FoldAttrs:
        return FoldAttrs(group=int(get_attr(node, "group", 1)))

    def in_channels(self, weight_shape: tuple[int, ...], attrs: FoldAttrs) -> int:
        return int(weight_shape[1]) * attrs.group

    def fold(self, weight: np.ndarray, bias: np.ndarray | None, s: np.ndarray, t: np.ndarray,
             attrs: FoldAttrs) -> tuple[np.ndarray, np.ndarray]:
        return arith.fold_forward_conv(weight, bias, s, t, attrs.group)

    def fold_cast(self, weight: np.ndarray, bias: np.ndarray | None, s: np.ndarray, t: np.ndarray,
                  attrs: FoldAttrs) -> tuple[np.ndarray, np.ndarray]:
        """``fold`` cast back to the weight's and bias's dtypes (``arith.FoldValueError`` if a value
        does not fit)."""
        w2, b2 = self.fold(weight, bias, s, t, attrs)
        w_out = arith.cast_back(w2, weight.dtype, original=weight)
        return w_out, arith.cast_back(b2, bias.dtype if bias is not None else weight.dtype,
                                      original=bias_original(bias, b2))


FORWARD = ForwardConvRule()
