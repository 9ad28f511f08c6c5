"""A session-shaped wrapper of ``onnx.reference.ReferenceEvaluator``, for models onnxruntime cannot run.

onnxruntime's CPU provider has no float64 Conv (nor ConvTranspose), so a float64 model, folded
correctly, could not be verified at all. The verification engine falls back to onnx's reference
evaluator for such a model on the CPU (:func:`needs_reference`): plain numpy, exact float64
arithmetic, slow (a Python loop per node), which is acceptable for the float64 models people fold
(small, numerical work). The wrapper offers what the engine uses of an
``onnxruntime.InferenceSession``: ``get_inputs``, ``get_outputs``, ``get_providers`` and ``run``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.ops.op_conv_transpose import ConvTranspose as _OnnxConvTranspose

__all__ = ["PROVIDER", "ReferenceSession", "needs_reference"]

#: what ``get_providers`` names, and the reports show as the provider used
PROVIDER = "onnx.reference.ReferenceEvaluator"

_ORT_TYPE = {"float32": "tensor(float)", "float64": "tensor(double)", "float16": "tensor(float16)"}


@dataclass(frozen=True)
class _Arg:
    name: str
    type: str


def needs_reference(message: str, model: onnx.ModelProto) -> bool:
    """Whether onnxruntime refused ``model`` (read without its external data) because a kernel is
    missing, and the model computes in float64: the case onnx's reference evaluator is for. Other
    missing kernels (an opset-6 BatchNormalization) stay onnxruntime's error: the reference
    evaluator is slow and its older op versions are not what the model will run on."""
    missing = "NOT_IMPLEMENTED" in message or "Could not find an implementation" in message
    return missing and _uses_float64(model)


def _uses_float64(model: onnx.ModelProto) -> bool:
    g = model.graph
    values = list(g.input) + list(g.output) + list(g.value_info)
    return (any(v.type.tensor_type.elem_type == onnx.TensorProto.DOUBLE for v in values)
            or any(t.data_type == onnx.TensorProto.DOUBLE for t in g.initializer))


class ConvTranspose(_OnnxConvTranspose):  # the op type onnx's evaluator matches by class name
    """onnx's reference ConvTranspose with ``group > 1`` done right: onnx 1.23 slices the weight by
    output instead of input channels, adds the whole bias to every group and writes each group's
    output into one channel, so a grouped float64 ConvTranspose gave wrong values or raised (and a
    correct fold then failed verification, or calibration read wrong statistics). Each group is
    run as its own ``group=1`` ConvTranspose, which onnx computes correctly, and the results are
    concatenated along the channel axis."""

    op_domain = ""

    def _run(self, X, W, B=None, **kwargs):  # type: ignore[no-untyped-def,override]
        group = int(kwargs.pop("group", None) or 1)
        if group == 1:
            return super()._run(X, W, B, group=1, **kwargs)
        cin_g, cout_g = X.shape[1] // group, W.shape[1]
        parts = []
        for g in range(group):
            b = None if B is None else B[g * cout_g:(g + 1) * cout_g]
            parts.append(np.asarray(super()._run(X[:, g * cin_g:(g + 1) * cin_g], W[g * cin_g:(g + 1) * cin_g],
                                                 b, group=1, **kwargs)[0]))
        return (np.concatenate(parts, axis=1).astype(X.dtype),)


def _arg(value: onnx.ValueInfoProto) -> _Arg:
    elem = value.type.tensor_type.elem_type
    try:
        name = np.dtype(helper.tensor_dtype_to_np_dtype(elem)).name
    except Exception:  # noqa: BLE001 - an unknown element type: no dtype-specific handling
        name = "unknown"
    return _Arg(value.name, _ORT_TYPE.get(name, f"tensor({name})"))


class ReferenceSession:
    """``run(names, feeds)`` of a model (path or ``ModelProto``) on onnx's reference evaluator."""

    def __init__(self, model: str | os.PathLike[str] | onnx.ModelProto) -> None:
        proto = model if isinstance(model, onnx.ModelProto) else onnx.load(os.fspath(model))
        self._inputs = [_arg(v) for v in proto.graph.input
                        if v.name not in {t.name for t in proto.graph.initializer}]
        self._outputs = [_arg(v) for v in proto.graph.output]
        self._evaluator = ReferenceEvaluator(proto, new_ops=[ConvTranspose])

    def get_inputs(self) -> list[_Arg]:
        return list(self._inputs)

    def get_outputs(self) -> list[_Arg]:
        return list(self._outputs)

    def get_providers(self) -> list[str]:
        return [PROVIDER]

    def run(self, names: list[str] | None, feeds: dict[str, Any]) -> list[np.ndarray]:
        wanted = names or [o.name for o in self._outputs]
        return [np.asarray(v) for v in self._evaluator.run(wanted, feeds)]
