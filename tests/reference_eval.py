"""An independent float64 numpy interpreter of (main-graph) ONNX models, for the fuzz tests.

Written from the ONNX operator specification, never from bnfold's code: the kernels are
``tests/npref.py`` (Conv, ConvTranspose, Gemm, BatchNormalization, themselves written from the
spec), and this module adds the graph walk, ``auto_pad`` and the few shape ops a fold chain holds.
Every tensor (initializers, Constant values, feeds) is widened to float64 first, so a model stored in
float16 or float32 is evaluated exactly on its stored values.

``stats`` replaces a training-mode BatchNormalization's statistics: ``{node name: (mean, var)}``
(the population statistics the test computed itself); a training-mode BN without an entry is
evaluated with its batch statistics, as the spec defines it.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import npref
import numpy as np
import onnx
from onnx import numpy_helper

Stats = Mapping[str, tuple[np.ndarray, np.ndarray]]


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _f64(t: onnx.TensorProto) -> np.ndarray:
    a = numpy_helper.to_array(t)
    return a.astype(np.float64) if a.dtype.kind == "f" else a


def auto_pads(auto_pad: str, in_sizes: tuple[int, ...], kernel: tuple[int, ...], strides: list[int],
              dilations: list[int]) -> list[int]:
    """Conv ``pads`` for an ``auto_pad`` mode (ONNX Conv spec): SAME_* make the output
    ``ceil(in / stride)``; the odd pad goes at the end (SAME_UPPER) or the beginning (SAME_LOWER)."""
    d = len(in_sizes)
    if auto_pad == "VALID":
        return [0] * (2 * d)
    begins, ends = [], []
    for i in range(d):
        out = -(-in_sizes[i] // strides[i])
        total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - in_sizes[i])
        small, large = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return begins + ends


def _conv(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, at: dict[str, Any]) -> np.ndarray:
    d = x.ndim - 2
    strides = list(at.get("strides", [1] * d))
    dilations = list(at.get("dilations", [1] * d))
    auto = at.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER", "VALID"):
        pads = auto_pads(auto, x.shape[2:], w.shape[2:], strides, dilations)
    else:
        pads = list(at.get("pads", [0] * (2 * d)))
    return npref.conv(x, w, b, strides=strides, pads=pads, dilations=dilations, groups=int(at.get("group", 1)))


def _batchnorm(node: onnx.NodeProto, ins: list[np.ndarray], at: dict[str, Any], stats: Stats) -> np.ndarray:
    x, gamma, beta, mean, var = ins
    eps = float(at.get("epsilon", 1e-5))
    if int(at.get("training_mode", 0)):
        if node.name in stats:
            mean, var = stats[node.name]
        else:  # batch statistics (biased variance), per the spec's training mode
            axes = (0, *range(2, x.ndim))
            mean, var = x.mean(axis=axes), x.var(axis=axes)
    return npref.batchnorm(x, gamma, beta, mean, var, eps)


def _run_node(node: onnx.NodeProto, ins: list[np.ndarray | None], stats: Stats) -> np.ndarray:
    op, at = node.op_type, _attrs(node)
    x = ins[0]
    if op == "Conv":
        return _conv(x, ins[1], ins[2] if len(ins) > 2 else None, at)
    if op == "ConvTranspose":
        return npref.conv_transpose(x, ins[1], ins[2] if len(ins) > 2 else None,
                                    strides=at.get("strides"), pads=at.get("pads"),
                                    output_padding=at.get("output_padding"), dilations=at.get("dilations"),
                                    groups=int(at.get("group", 1)))
    if op == "Gemm":
        a = x.T if at.get("transA", 0) else x
        return npref.gemm(a, ins[1], ins[2] if len(ins) > 2 else None, alpha=float(at.get("alpha", 1.0)),
                          beta=float(at.get("beta", 1.0)), trans_b=bool(at.get("transB", 0)))
    if op == "MatMul":
        return np.matmul(x, ins[1])
    if op == "Add":
        return x + ins[1]
    if op == "Mul":
        return x * ins[1]
    if op == "Relu":
        return np.maximum(x, 0.0)
    if op == "Identity":
        return x
    if op == "Transpose":
        return np.transpose(x, at.get("perm"))
    if op == "Reshape":
        shape = [int(s) for s in ins[1]]
        if not int(at.get("allowzero", 0)):
            shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return x.reshape(shape)
    if op in ("Squeeze", "Unsqueeze"):
        axes = [int(a) for a in (ins[1] if len(ins) > 1 and ins[1] is not None else at["axes"])]
        if op == "Squeeze":
            return np.squeeze(x, axis=tuple(a % x.ndim for a in axes))
        out_rank = x.ndim + len(axes)
        return np.expand_dims(x, axis=tuple(sorted(a % out_rank for a in axes)))
    if op == "BatchNormalization":
        return _batchnorm(node, ins, at, stats)  # type: ignore[arg-type]
    raise NotImplementedError(f"reference_eval has no {op}")


def evaluate(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], stats: Stats | None = None,
             outputs: list[str] | None = None) -> dict[str, np.ndarray]:
    """Every graph output (or the named tensors ``outputs``) of ``model`` on ``feeds``, in float64."""
    env: dict[str, np.ndarray | None] = {"": None}
    for t in model.graph.initializer:
        env[t.name] = _f64(t)
    for name, value in feeds.items():
        value = np.asarray(value)
        env[name] = value.astype(np.float64) if value.dtype.kind == "f" else value
    for node in model.graph.node:
        if node.op_type == "Constant":
            env[node.output[0]] = _f64(_attrs(node)["value"])
            continue
        env[node.output[0]] = _run_node(node, [env[i] for i in node.input], stats or {})
    wanted = outputs if outputs is not None else [o.name for o in model.graph.output]
    result = {}
    for name in wanted:
        value = env[name]
        assert value is not None
        result[name] = value
    return result
