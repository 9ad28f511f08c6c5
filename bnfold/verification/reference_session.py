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
        self._evaluator = ReferenceEvaluator(proto)

    def get_inputs(self) -> list[_Arg]:
        return list(self._inputs)

    def get_outputs(self) -> list[_Arg]:
        return list(self._outputs)

    def get_providers(self) -> list[str]:
        return [PROVIDER]

    def run(self, names: list[str] | None, feeds: dict[str, Any]) -> list[np.ndarray]:
        wanted = names or [o.name for o in self._outputs]
        return [np.asarray(v) for v in self._evaluator.run(wanted, feeds)]
