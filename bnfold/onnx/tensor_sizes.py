"""Tensors whose data is not what their dims declare: refused at load, before anything is allocated.

A truncated model file, an external-data file shorter than its tensors, or dims of terabytes over
a few bytes of data would otherwise end in numpy's "cannot reshape" or a MemoryError deep in the
fold. Every check compares the declared size (exact Python integers, however large) with the bytes
or values present, so nothing the size of the declaration is ever allocated.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path

import onnx

from bnfold.errors import BadInputError

# bits per element of the raw_data of each element type (FLOAT6*: packing not pinned down, unchecked)
_T = onnx.TensorProto
_RAW_BITS: dict[int, int] = {
    _T.FLOAT: 32, _T.UINT8: 8, _T.INT8: 8, _T.UINT16: 16, _T.INT16: 16, _T.INT32: 32, _T.INT64: 64,
    _T.BOOL: 8, _T.FLOAT16: 16, _T.DOUBLE: 64, _T.UINT32: 32, _T.UINT64: 64, _T.COMPLEX64: 64,
    _T.COMPLEX128: 128, _T.BFLOAT16: 16, _T.FLOAT8E4M3FN: 8, _T.FLOAT8E4M3FNUZ: 8, _T.FLOAT8E5M2: 8,
    _T.FLOAT8E5M2FNUZ: 8,
    **{getattr(_T, n): b for n, b in (("UINT4", 4), ("INT4", 4), ("FLOAT4E2M1", 4), ("FLOAT8E8M0", 8),
                                      ("UINT2", 2), ("INT2", 2)) if hasattr(_T, n)},
}
# the typed field that holds the values when there is no raw_data, with values per element
_FIELD: dict[int, tuple[str, int]] = {
    _T.FLOAT: ("float_data", 1), _T.COMPLEX64: ("float_data", 2), _T.DOUBLE: ("double_data", 1),
    _T.COMPLEX128: ("double_data", 2), _T.INT64: ("int64_data", 1), _T.UINT32: ("uint64_data", 1),
    _T.UINT64: ("uint64_data", 1), _T.STRING: ("string_data", 1),
    **{code: ("int32_data", 1) for code in (_T.INT32, _T.INT16, _T.INT8, _T.UINT16, _T.UINT8, _T.BOOL,
                                            _T.FLOAT16, _T.BFLOAT16, _T.FLOAT8E4M3FN, _T.FLOAT8E4M3FNUZ,
                                            _T.FLOAT8E5M2, _T.FLOAT8E5M2FNUZ)},
}


def _declared(t: onnx.TensorProto) -> tuple[int, str]:
    """Element count of ``t``'s dims (exact, however large) and the dims as text."""
    n = 1
    for d in t.dims:
        n *= d
    return n, "[" + ", ".join(map(str, t.dims)) + "]"


def _raw_bytes(t: onnx.TensorProto, n: int) -> int | None:
    bits = _RAW_BITS.get(t.data_type)
    return None if bits is None else (n * bits + 7) // 8


def _size_problem(t: onnx.TensorProto, source: str | None) -> str | None:
    """Why the data of the (loaded) tensor ``t`` does not match its dims, or None."""
    if t.HasField("segment") or t.data_location == onnx.TensorProto.EXTERNAL:
        return None
    n, dims = _declared(t)
    if any(d < 0 for d in t.dims):
        return f"tensor '{t.name}' declares negative dims {dims}"
    if t.HasField("raw_data"):
        want = _raw_bytes(t, n)
        have = len(t.raw_data)
        if want is None or have == want:
            return None
        where = f"its external data file '{source}' holds" if source is not None else "it holds"
        return f"tensor '{t.name}' declares shape {dims} ({want} bytes) but {where} {have} bytes"
    field = _FIELD.get(t.data_type)
    if field is None:
        return None
    have = len(getattr(t, field[0]))
    if have == n * field[1]:
        return None
    return f"tensor '{t.name}' declares shape {dims} ({n} values) but holds {have // field[1]} values"


def check(tensors: Iterable[onnx.TensorProto], path: Path | str, sources: dict[str, str]) -> None:
    """Refuse a tensor whose data is not what its dims declare (a truncated file, a short data file,
    dims of terabytes over a few bytes), before anything is allocated for it. ``sources``: tensor
    name -> external-data file the tensor was read from. Tensors left in their file
    (``deferred``) are checked against the byte range they name."""
    bits_of = _RAW_BITS.get
    for t in tensors:
        raw = t.raw_data  # the common case, first and cheaply (about 1 us a tensor): raw data of the declared size
        if raw:
            bits = bits_of(t.data_type)
            if bits is not None and (math.prod(t.dims) * bits + 7) // 8 == len(raw):
                continue
        if t.data_location == onnx.TensorProto.EXTERNAL:
            problem = _deferred_problem(t)
        else:
            problem = _size_problem(t, sources.get(t.name))
        if problem is not None:
            fix = ("the data file is truncated or belongs to another model: copy the model with its data files "
                   "again" if t.name in sources or t.data_location == onnx.TensorProto.EXTERNAL
                   else "the model file is truncated or corrupt: export or copy it again")
            raise BadInputError(f"'{path}': {problem}; {fix}")


def _deferred_problem(t: onnx.TensorProto) -> str | None:
    """Declared size against the byte range (``length``) an external tensor names."""
    want = _raw_bytes(t, _declared(t)[0])
    length = next((e.value for e in t.external_data if e.key == "length"), None)
    if want is None or length is None or not length.isdigit() or int(length) == want:
        return None
    location = next((e.value for e in t.external_data if e.key == "location"), "")
    return (f"tensor '{t.name}' declares shape {_declared(t)[1]} ({want} bytes) but its external data in "
            f"'{location}' is {length} bytes long")


def check_external(t: onnx.TensorProto, path: Path) -> None:
    """An external tensor of the model at ``path``, checked as onnx's loader would read it (its
    resolver: containment in the model's folder; the file's bounds; the declared size), unread."""
    base = str(path.parent)
    try:
        info = onnx.external_data_helper.ExternalDataInfo(t)
        fd = onnx.external_data_helper._open_external_data_fd(base, info.location, t.name, True)
        try:
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        offset = info.offset or 0
        if offset > size:
            raise ValueError(f"External data offset ({offset}) exceeds file size ({size}) for tensor {t.name!r}")
        length = info.length if info.length is not None else size - offset
        if length > size - offset:
            raise ValueError(f"External data length ({length}) exceeds available data "
                             f"({size - offset} bytes from offset {offset}) for tensor {t.name!r}")
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise BadInputError(
            f"external data of '{path}' could not be read ({exc}); keep the data files next to the model"
        ) from exc
    want = _raw_bytes(t, _declared(t)[0])
    if want is not None and want != length:
        raise BadInputError(
            f"'{path}': tensor '{t.name}' declares shape {_declared(t)[1]} ({want} bytes) but its external data "
            f"file '{info.location}' holds {length} bytes; the data file is truncated or belongs to another model: "
            "copy the model with its data files again")
