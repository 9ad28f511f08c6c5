"""Constant values of tensors: initializers, Constant nodes, and small constant subgraphs.

Paddle keeps weights in Constant nodes; some exporters compute them (Cast, Mul by a scale,
ConstantOfShape); torch's eval export routes parameters through Identity. All count as constants
once evaluated. Evaluation is memoised and bounded in depth and size.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnfold.errors import BadInputError
from bnfold.graph.attrs import get_attr
from bnfold.graph.index import GraphIndex
from bnfold.onnx import deferred

_MAX_DEPTH = 12
_MAX_ELEMENTS = 1 << 28

# element types whose raw_data is plain little-endian numpy memory
_RAW_DTYPES: dict[int, np.dtype[Any]] = {
    onnx.TensorProto.FLOAT: np.dtype("<f4"),
    onnx.TensorProto.DOUBLE: np.dtype("<f8"),
    onnx.TensorProto.FLOAT16: np.dtype("<f2"),
    onnx.TensorProto.INT64: np.dtype("<i8"),
    onnx.TensorProto.INT32: np.dtype("<i4"),
}

_RAW_SIZES: dict[int, int] = {code: dt.itemsize for code, dt in _RAW_DTYPES.items()}

# little-endian numpy dtypes written as raw_data by ``array_to_tensor``'s fast path
_RAW_BY_NUMPY: dict[np.dtype[Any], int] = {
    np.dtype("<f4"): onnx.TensorProto.FLOAT, np.dtype("<f8"): onnx.TensorProto.DOUBLE,
    np.dtype("<f2"): onnx.TensorProto.FLOAT16,
}


def tensor_to_array(t: onnx.TensorProto) -> np.ndarray:
    """``numpy_helper.to_array`` with a fast path for raw little-endian data (read-only view).
    A tensor left in its data file at load (``onnx.deferred``) is read from it now."""
    dt = _RAW_DTYPES.get(t.data_type)
    if deferred.is_deferred(t):
        if dt is None:
            return numpy_helper.to_array(deferred.loaded_copy(t))
        return np.frombuffer(deferred.tensor_bytes(t), dtype=dt).reshape(tuple(t.dims))
    _require_loaded(t)
    if dt is not None:
        raw = t.raw_data  # each access copies the bytes: read it once
        if raw:
            a = np.frombuffer(raw, dtype=dt)
            dims = t.dims
            return a if len(dims) == 1 and dims[0] == a.size else a.reshape(tuple(dims))
    return numpy_helper.to_array(t)


def _require_loaded(t: onnx.TensorProto) -> None:
    """Refuse a tensor still in external data. ``load_onnx`` reads every external tensor of a model
    file against the model's folder (or defers it, above); one still external came in memory
    without its folder, and numpy_helper would read it from the current folder, nobody's data."""
    if t.data_location == onnx.TensorProto.EXTERNAL:
        where = next((f"location '{e.value}'" for e in t.external_data if e.key == "location"), "no location")
        raise BadInputError(f"tensor '{t.name}' is stored in external data ({where}) that was not loaded; pass the "
                            "model's path, or load it with onnx.load(path) so that its external data is read")


def raw_values(initializers: dict[str, onnx.TensorProto], names: list[str],
               rank: int | None = None) -> tuple[np.ndarray, list[int]] | None:
    """The named initializers' values flattened and concatenated into one read-only array, and
    their element counts: one numpy object for all of them (for thousands of small tensors that
    is most of the cost). None unless each is a raw-data initializer (of rank ``rank`` if given)
    and all share one dtype."""
    # one comprehension per attribute: for thousands of tiny tensors the interpreter's per-step
    # cost, not protobuf, is what counts
    get = initializers.get
    found = [get(name) for name in names]
    tensors = [t for t in found if t is not None]
    if not tensors or len(tensors) != len(found):
        return None
    codes = {t.data_type for t in tensors}
    dt = _RAW_DTYPES.get(codes.pop()) if len(codes) == 1 else None
    if dt is None or dt.kind != "f":
        return None
    raws = [t.raw_data for t in tensors]  # each access copies the bytes: read once
    if not all(raws) or onnx.TensorProto.EXTERNAL in {t.data_location for t in tensors}:
        return None
    size = dt.itemsize
    if any(len(r) % size for r in raws):
        return None
    counts = [len(r) // size for r in raws]
    if rank is not None:
        dims = [t.dims for t in tensors]
        if any(len(d) != rank for d in dims) or (rank == 1 and [d[0] for d in dims] != counts):
            return None
    return np.frombuffer(b"".join(raws), dtype=dt), counts


def array_to_tensor(array: np.ndarray, name: str, into: onnx.TensorProto | None = None) -> onnx.TensorProto:
    """A TensorProto holding ``array`` as raw data; ``into`` is overwritten in place if given."""
    code = _RAW_BY_NUMPY.get(array.dtype)
    if code is not None:
        if into is None:
            t = onnx.TensorProto()
            t.name, t.data_type = name, code
            t.dims.extend(array.shape)
            t.raw_data = np.ascontiguousarray(array).tobytes()
            return t
        if into.data_type == code and into.name == name and into.HasField("raw_data") \
                and into.data_location != onnx.TensorProto.EXTERNAL and tuple(into.dims) == array.shape \
                and not into.HasField("segment"):
            # same name, dtype and shape, raw data: only the bytes change
            into.raw_data = np.ascontiguousarray(array).tobytes()
            return into
    dt = _RAW_DTYPES.get(helper.np_dtype_to_tensor_dtype(array.dtype)) if array.dtype.kind == "f" else None
    if dt is None or into is None:
        t = numpy_helper.from_array(array, name)
        if into is None:
            return t
        into.CopyFrom(t)
        return into
    into.Clear()
    into.name = name
    into.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
    into.dims.extend(array.shape)
    into.raw_data = np.ascontiguousarray(array, dtype=dt).tobytes()
    return into


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    for a in node.attribute:
        if a.name == "value":
            _require_loaded(a.t)
            return numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
    return None  # sparse_value / strings: not handled


def _axes(node: onnx.NodeProto, args: list[np.ndarray]) -> list[int] | None:
    if len(args) > 1:
        return [int(v) for v in args[1].reshape(-1)]
    ax = get_attr(node, "axes")
    return None if ax is None else [int(v) for v in ax]


def _unsqueeze(node: onnx.NodeProto, args: list[np.ndarray]) -> np.ndarray | None:
    x, axes = args[0], _axes(node, args)
    if axes is None:
        return None
    out_rank = x.ndim + len(axes)
    for a in sorted(a % out_rank for a in axes):
        x = np.expand_dims(x, a)
    return x


def _squeeze(node: onnx.NodeProto, args: list[np.ndarray]) -> np.ndarray:
    x, axes = args[0], _axes(node, args)
    if axes is None:
        return np.squeeze(x)
    return np.squeeze(x, axis=tuple(a % x.ndim for a in axes))


def _reshape(node: onnx.NodeProto, args: list[np.ndarray]) -> np.ndarray:
    x, shape = args[0], [int(v) for v in args[1].reshape(-1)]
    if not get_attr(node, "allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _flatten(node: onnx.NodeProto, args: list[np.ndarray]) -> np.ndarray | None:
    """Flatten's axis lies in [-r, r]: axis r gives (size, 1), axis 0 gives (1, size)."""
    x, axis = args[0], int(get_attr(node, "axis", 1))
    if axis < 0:
        axis += x.ndim
    if not 0 <= axis <= x.ndim:
        return None
    lead = int(np.prod(x.shape[:axis], dtype=np.int64))
    return x.reshape(lead, int(np.prod(x.shape[axis:], dtype=np.int64)))


def _cast(node: onnx.NodeProto, args: list[np.ndarray]) -> np.ndarray:
    to = get_attr(node, "to")
    return args[0].astype(helper.tensor_dtype_to_np_dtype(to))


def _constant_of_shape(node: onnx.NodeProto, args: list[np.ndarray]) -> np.ndarray | None:
    shape = [int(v) for v in args[0].reshape(-1)] if args else []
    if int(np.prod(shape, dtype=np.int64)) > _MAX_ELEMENTS:
        return None
    val = get_attr(node, "value")
    fill = numpy_helper.to_array(val).reshape(-1)[0] if val is not None else np.float32(0)
    return np.full(shape, fill, dtype=np.asarray(fill).dtype)


def _expand(node: onnx.NodeProto, args: list[np.ndarray]) -> np.ndarray | None:
    shape = np.broadcast_shapes(args[0].shape, tuple(int(v) for v in args[1].reshape(-1)))
    if int(np.prod(shape, dtype=np.int64)) > _MAX_ELEMENTS:
        return None
    return np.broadcast_to(args[0], shape).copy()


def _shape(node: onnx.NodeProto, args: list[np.ndarray]) -> np.ndarray:
    dims = args[0].shape
    start, end = get_attr(node, "start", 0), get_attr(node, "end", None)
    return np.array(dims[start:end], dtype=np.int64)


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """ONNX Div: integer division truncates toward zero (C semantics, as onnxruntime computes
    it), where numpy's ``//`` floors: -3 / 2 is -1, not -2."""
    if a.dtype.kind == "f" or b.dtype.kind == "f":
        return a / b
    q = np.abs(a) // np.abs(b)
    return np.where((a < 0) != (b < 0), -q, q)


_Op = Callable[[onnx.NodeProto, list[np.ndarray]], np.ndarray | None]


def _binary(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> _Op:
    def run(node: onnx.NodeProto, args: list[np.ndarray]) -> np.ndarray:
        a, b = args
        out = fn(a, b)
        return out.astype(np.result_type(a.dtype, b.dtype), copy=False)

    return run


_OPS: dict[str, _Op] = {
    "Identity": lambda n, a: a[0],
    "Cast": _cast,
    "Mul": _binary(np.multiply),
    "Add": _binary(np.add),
    "Sub": _binary(np.subtract),
    "Div": _binary(_div),
    "Sqrt": lambda n, a: np.sqrt(a[0]),
    "Neg": lambda n, a: -a[0],
    "Reshape": _reshape,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Flatten": _flatten,
    "Transpose": lambda n, a: np.transpose(a[0], get_attr(n, "perm")),
    "ConstantOfShape": _constant_of_shape,
    "Expand": _expand,
    "Shape": _shape,
}


class Constants:
    """Resolves the constant value of a tensor name, or None when it is not constant.

    An initializer that is also a graph input (``GraphIndex.overridable``, IR >= 4) is a default
    the caller may replace at run time (onnxruntime feeds it when given): not a constant, and
    nothing computed from it is either. ``default`` still reads its stored value, for what does not
    depend on the value fed (a channel count, the defaults calibration runs with).
    """

    def __init__(self, index: GraphIndex) -> None:
        self.index = index
        self._cache: dict[str, np.ndarray | None] = {}

    def value(self, name: str) -> np.ndarray | None:
        if not name or name in self.index.overridable:
            return None
        init = self.index.initializers.get(name)
        if init is not None:  # not cached: weights are large and read once
            return tensor_to_array(init)
        return self._eval(name, 0)

    def default(self, name: str) -> np.ndarray | None:
        """The value ``name`` has when the caller feeds nothing: an overridable initializer's
        stored default, else ``value``."""
        init = self.index.initializers.get(name) if name in self.index.overridable else None
        return tensor_to_array(init) if init is not None else self.value(name)

    def is_constant(self, name: str) -> bool:
        if name in self.index.overridable:
            return False
        if name in self.index.initializers:
            return True
        return self.value(name) is not None

    def _eval(self, name: str, depth: int) -> np.ndarray | None:
        if name in self.index.overridable:
            return None
        if name in self.index.initializers:  # not cached: weights are large and read once
            return tensor_to_array(self.index.initializers[name])
        if name in self._cache:
            return self._cache[name]
        result = self._compute(name, depth)
        if result is not None and result.size > _MAX_ELEMENTS:
            result = None
        self._cache[name] = result
        return result

    def _compute(self, name: str, depth: int) -> np.ndarray | None:
        idx = self.index
        if name in idx.initializers and name not in idx.overridable:
            return tensor_to_array(idx.initializers[name])
        if name in idx.graph_inputs or name in idx.overridable or depth > _MAX_DEPTH:
            return None
        node = idx.node_of(name)
        if node is None or node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type == "Constant":
            return _constant_node_value(node)
        if node.op_type == "CastLike" and len(node.input) == 2:
            # the dynamo exporter writes a Conv's absent bias as Expand(CastLike(0, x), shape): only
            # x's element type matters, not its (run-time) value
            to = idx.elem_type(node.input[1])
            src = self._eval(node.input[0], depth + 1)
            if to is None or src is None:
                return None
            return src.astype(helper.tensor_dtype_to_np_dtype(to))
        op = _OPS.get(node.op_type)
        if op is None or len(node.output) != 1:
            return None
        args: list[np.ndarray] = []
        for inp in node.input:
            if not inp:
                continue
            v = self._eval(inp, depth + 1)
            if v is None:
                return None
            args.append(v)
        try:
            out = op(node, args)
        except (ValueError, TypeError, IndexError):
            return None
        return None if out is None else np.asarray(out)
