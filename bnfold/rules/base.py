"""What every rule has: the refusal it raises, the attributes its formula reads, and the view of
the graph it may ask about (the planner provides it; rules never walk the graph)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np
import onnx

from bnfold.formulas import arith
from bnfold.records import Reason


class Refuse(Exception):
    """A fold that cannot be done, and why: ``reason`` and ``detail``, one human sentence."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class FoldAttrs:
    """The producer attributes a fold formula reads (ONNX names; a torch ``Linear`` is a Gemm
    with ``trans_b=True``)."""

    group: int = 1
    trans_b: bool = False
    alpha: float = 1.0
    beta: float = 1.0


@dataclass(frozen=True)
class Match:
    """A producer that can take the fold: its output channels and output rank."""

    out_channels: int
    rank: int


class GraphView(Protocol):
    """The questions a rule may ask the ONNX planner about the graph."""

    def require_const(self, name: str, what: str, node: onnx.NodeProto) -> tuple[int, ...]:
        """The shape of constant ``name``; refuses NOT_CONSTANT (naming ``what``) otherwise."""
        ...

    def require_float(self, name: str, node: onnx.NodeProto) -> None:
        """Refuses UNSUPPORTED_DTYPE unless ``name`` is floating point (or of unknown type)."""
        ...

    def is_constant(self, name: str) -> bool: ...

    def is_initializer(self, name: str) -> bool: ...

    def rank(self, name: str) -> int | None: ...


def bias_original(b: np.ndarray | None, folded: np.ndarray) -> np.ndarray:
    """The bias before folding, shaped like the folded one (zeros where there was none).

    A folded bias that underflows where the old one was zero or absent is harmless; only a
    normal old value turning subnormal counts (docs/math.md section 3).
    """
    if b is not None and b.size == folded.size:
        return b.reshape(folded.shape)
    return np.zeros_like(folded)


class BackwardRule:
    """Folding a BN into the producer of its input (docs/math.md section 3), for one op type.

    ``match`` checks an ONNX node (raising :class:`Refuse`); ``out_channels`` reads the channel
    count off the weight shape; ``fold`` gives the folded float64 (weight, bias); ``fold_cast``
    casts them back to the weight's and bias's dtypes (raising ``arith.FoldValueError``).
    ``bias_slot`` is the input that takes the folded bias, None where it becomes a following Add.
    """

    op_type: ClassVar[str]
    bias_slot: ClassVar[int | None] = 2

    def match(self, node: onnx.NodeProto, ins: list[str], graph: GraphView) -> Match:
        raise NotImplementedError

    @staticmethod
    def conv_weight(node: onnx.NodeProto, ins: list[str], graph: GraphView) -> tuple[int, ...]:
        """The checks a Conv-like node (X, W[, B]) shares: a constant float weight (its shape is
        returned) and, where the bias is not an initializer, a constant bias."""
        w = graph.require_const(ins[1] if len(ins) > 1 else "", "weight", node)  # none: an invalid node, kept
        if len(ins) > 2 and ins[2] and not graph.is_initializer(ins[2]):
            graph.require_const(ins[2], "bias", node)
        graph.require_float(ins[1], node)
        return w

    def attrs(self, node: onnx.NodeProto) -> FoldAttrs:
        """The attributes of ``node`` the formula reads."""
        return FoldAttrs()

    def out_channels(self, weight_shape: tuple[int, ...], attrs: FoldAttrs) -> int:
        raise NotImplementedError

    def fold(self, weight: np.ndarray, bias: np.ndarray | None, s: np.ndarray, t: np.ndarray,
             attrs: FoldAttrs) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def fold_cast(self, weight: np.ndarray, bias: np.ndarray | None, s: np.ndarray, t: np.ndarray,
                  attrs: FoldAttrs) -> tuple[np.ndarray, np.ndarray]:
        """``fold``, then the weight cast back to its dtype and the bias to its own (the weight's
        where there was none); raises ``arith.FoldValueError`` for a value the dtype cannot hold."""
        w2, b2 = self.fold(weight, bias, s, t, attrs)
        w_out = arith.cast_back(w2, weight.dtype, original=weight)
        b_dtype = bias.dtype if bias is not None else weight.dtype
        return w_out, arith.cast_back(b2, b_dtype, original=bias_original(bias, b2))

    def finish(self, node: onnx.NodeProto) -> None:
        """Attribute edits the folded node needs once its parameters are written (none by default)."""
