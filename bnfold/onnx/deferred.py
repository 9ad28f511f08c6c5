"""Large external tensors left in their data file at load ("deferred"): read on demand, copied in chunks.

``load_onnx`` reads external data as onnx's loader does, except that a main-graph initializer of
at least ``DEFER_MIN_BYTES`` is only checked (``defer``), never read: it stays
``data_location = EXTERNAL`` with the entries the model file gave it (location, offset, length)
plus ``basepath``, the model's folder (a key of onnx's own ``ExternalDataInfo``). Every open of
its file goes through onnx's own resolver (``external_data_helper._open_external_data_fd``), so
the containment rules (no absolute path, no ``..``, no link out of the model's folder) and their
messages are onnx's; and the file must be the one seen at load (size, mtime, inode, device), else
``BadInputError``. Readers: ``tensor_bytes`` / ``loaded_copy`` (values), ``copy_to`` (a writer
copies the byte range in ``COPY_CHUNK`` pieces, never holding the tensor whole).
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from typing import BinaryIO, NamedTuple

import onnx
from onnx import ModelProto, TensorProto
from onnx import external_data_helper as _edh

from bnfold.errors import BadInputError

#: external main-graph initializers of at least this many bytes are not read at load
DEFER_MIN_BYTES = 64 * 2**20
#: a deferred tensor is copied from its file in pieces of this size
COPY_CHUNK = 16 * 2**20
BASEPATH = "basepath"
#: private key of a deferred tensor: its data file's stamp at load (size:mtime_ns:inode:device)
STAMP = "bnfold_stamp"

_Stamp = tuple[int, int, int, int]
#: (model folder, location, stamp) of every data file a load deferred tensors of, with the
#: (size, mtime_ns, inode, device) it had then. The stamp is also kept in each tensor (:data:`STAMP`):
#: a later load of a replaced file under the same name must not make an earlier load's tensors
#: read the new bytes.
_STAMPS: dict[tuple[str, str, str], _Stamp] = {}


def supported() -> bool:
    """Whether the installed onnx exposes the resolver its loader uses (else everything is read at load)."""
    return hasattr(_edh, "_open_external_data_fd") and hasattr(_edh, "ExternalDataInfo")


def _fd_stamp(fd: int) -> _Stamp:
    st = os.fstat(fd)
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


def _check_bounds(size: int, offset: int, length: int, name: str) -> None:
    """onnx's ``_validate_external_data_file_bounds`` checks, with its messages, without the read."""
    if offset > size:
        raise ValueError(f"External data offset ({offset}) exceeds file size ({size}) for tensor {name!r}")
    if length > size - offset:
        raise ValueError(f"External data length ({length}) exceeds available data "
                         f"({size - offset} bytes from offset {offset}) for tensor {name!r}")


def defer(tensor: TensorProto, base_dir: str) -> bool:
    """Check the external ``tensor`` as onnx's loader would before reading it (same errors), and
    leave it unread if it holds at least ``DEFER_MIN_BYTES``: record its folder and its file's
    stamp and return True. False (nothing recorded) for a tensor the caller must load."""
    info = _edh.ExternalDataInfo(tensor)  # ValueError for a negative offset or length, as onnx
    if info.length is None or info.length < DEFER_MIN_BYTES or tensor.data_type == TensorProto.STRING:
        return False
    offset = info.offset or 0
    fd = _edh._open_external_data_fd(base_dir, info.location, tensor.name, True)
    try:
        stamp = _fd_stamp(fd)
    finally:
        os.close(fd)
    _check_bounds(stamp[0], offset, info.length, tensor.name)
    base = os.path.abspath(base_dir)
    keep = [(e.key, e.value) for e in tensor.external_data if e.key not in (BASEPATH, STAMP)]
    mark = ":".join(map(str, stamp))
    del tensor.external_data[:]
    for key, value in (*keep, (BASEPATH, base), (STAMP, mark)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    _STAMPS[(base, info.location, mark)] = stamp
    return True


class _Source(NamedTuple):
    """Where a deferred tensor's bytes are: its :data:`_STAMPS` key (model folder, location, stamp)."""

    key: tuple[str, str, str]
    offset: int
    length: int


def _source(tensor: TensorProto) -> _Source | None:
    """Where a deferred tensor's bytes are; None for any other tensor."""
    if tensor.data_location != TensorProto.EXTERNAL:
        return None
    keys = {e.key: e.value for e in tensor.external_data}
    base, location, mark, length = keys.get(BASEPATH), keys.get("location"), keys.get(STAMP), keys.get("length")
    if base is None or location is None or mark is None or length is None or (base, location, mark) not in _STAMPS:
        return None
    return _Source((base, location, mark), int(keys.get("offset") or 0), int(length))


def is_deferred(tensor: TensorProto) -> bool:
    return _source(tensor) is not None


def has_deferred(tensors: Iterable[TensorProto]) -> bool:
    """Whether any of ``tensors`` is deferred."""
    return any(_source(t) is not None for t in tensors)


def _open_checked(tensor: TensorProto, key: tuple[str, str, str]) -> int:
    """A read-only descriptor of the deferred tensor's file (``key``: its :data:`_STAMPS` key),
    opened by onnx's resolver, after checking the file is the one seen at load."""
    base, location, _ = key
    path = os.path.join(base, location)
    try:
        fd = _edh._open_external_data_fd(base, location, tensor.name, True)
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise BadInputError(f"external data of tensor '{tensor.name}' could not be read ({exc}); "
                            "keep the data files next to the model") from exc
    if _fd_stamp(fd) != _STAMPS[key]:
        os.close(fd)
        raise BadInputError(f"external data file '{path}' of tensor '{tensor.name}' changed since the model "
                            "was read; leave the model's data files unchanged while bnfold runs, then run it again")
    return fd


def _read_exact(fd: int, offset: int, n: int) -> bytes:
    parts: list[bytes] = []
    while n:
        part = os.pread(fd, n, offset)
        if not part:
            raise BadInputError(f"external data file ended early (at byte {offset}); "
                                "leave the model's data files unchanged while bnfold runs")
        parts.append(part)
        offset += len(part)
        n -= len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def tensor_bytes(tensor: TensorProto) -> bytes:
    """The raw bytes of a deferred tensor, read from its file now."""
    src = _source(tensor)
    assert src is not None, f"tensor '{tensor.name}' is not deferred"
    fd = _open_checked(tensor, src.key)
    try:
        return _read_exact(fd, src.offset, src.length)
    finally:
        os.close(fd)


def loaded_copy(tensor: TensorProto) -> TensorProto:
    """A copy of a deferred tensor with its data in ``raw_data`` (as onnx's loader leaves it)."""
    out = TensorProto()
    out.CopyFrom(tensor)
    out.raw_data = tensor_bytes(tensor)
    out.data_location = TensorProto.DEFAULT
    del out.external_data[:]
    return out


def copy_to(tensor: TensorProto, fh: BinaryIO) -> int:
    """Append a deferred tensor's bytes to ``fh`` in ``COPY_CHUNK`` pieces; the number written. The
    file is checked unchanged before and after the copy."""
    src = _source(tensor)
    assert src is not None, f"tensor '{tensor.name}' is not deferred"
    base, location, _ = src.key
    offset, length = src.offset, src.length
    fd = _open_checked(tensor, src.key)
    try:
        done = 0
        while done < length:
            fh.write(_read_exact(fd, offset + done, min(COPY_CHUNK, length - done)))
            done += min(COPY_CHUNK, length - done)
        if _fd_stamp(fd) != _STAMPS[src.key]:
            raise BadInputError(f"external data file '{os.path.join(base, location)}' of tensor '{tensor.name}' "
                                "changed while it was copied; leave the model's data files unchanged while bnfold "
                                "runs, then run it again")
    finally:
        os.close(fd)
    return length


def materialize(model: ModelProto) -> None:
    """Read every deferred tensor of ``model``'s main graph into ``raw_data``, leaving the model as
    onnx's own loader would (for a caller who uses the in-memory model beyond bnfold)."""
    for i, tensor in enumerate(model.graph.initializer):
        if is_deferred(tensor):
            model.graph.initializer[i].CopyFrom(loaded_copy(tensor))
