"""Calibration data behind one small protocol: an iterable of ``{input_name: array}`` batches.

Accepted sources (:func:`open_data`):

* ``.npz`` -- one array per model input, keyed by the input's name; the leading axis is samples.
* ``.npy`` -- a single array, only for a model with exactly one input.
* a directory of such files, read in sorted file-name order (plain string order: name shards
  with zero-padded numbers); samples are concatenated in that order and a batch may span two
  files. Other files in the directory are ignored.

Memory: nothing is loaded up front. At open time only the ``.npy`` headers are read (for an
``.npz`` the header of each member), which is enough to validate names, ranks, shapes, dtypes
and sample counts. While iterating, ``.npy`` files and members of an *uncompressed* ``.npz``
(``np.savez``) are memory-mapped and each batch is built by slicing the maps, copying only the
batch; only the file(s) the current batch touches are open. So a data set larger than RAM works.
A *compressed* ``.npz`` (``np.savez_compressed``) cannot be mapped: its members are decompressed
lazily, one file at a time, when the first batch that needs that file is built, and released when
iteration moves past it -- so one compressed file must fit in memory (shard big data sets into a
directory of files, or save them uncompressed).

NaN and Inf are checked per batch as it streams (a huge mapped file is not scanned twice); the
error names the input, the file, and the bad batch's sample range.

Every problem with the data is a :class:`bnfold.errors.BadInputError` with a one-line message
that says what is wrong and what to do.
"""
from __future__ import annotations

import bisect
import hashlib
import math
import mmap
import os
import struct
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from bnfold.api_checks import check_count
from bnfold.errors import BadInputError, one_line
from bnfold.records import InputSpec

__all__ = ["CalibrationData", "InputSpec", "from_arrays", "open_data"]


# --------------------------------------------------------------------------------------------
# model inputs
# --------------------------------------------------------------------------------------------


def _fmt_shape(shape: Sequence[int | None]) -> str:
    inner = ", ".join("?" if d is None else str(d) for d in shape)
    return f"({inner},)" if len(shape) == 1 else f"({inner})"


def _names(names: Sequence[str]) -> str:
    return ", ".join(f"'{n}'" for n in names) if names else "none"


# --------------------------------------------------------------------------------------------
# one stored array (header facts only) and one file
# --------------------------------------------------------------------------------------------

_NPY = "npy"  # a .npy file: mapped
_STORED = "npz-stored"  # uncompressed npz member: mapped
_PACKED = "npz-compressed"  # compressed npz member: read whole, lazily
_MEMORY = "memory"  # an array handed to from_arrays


@dataclass
class _Member:
    key: str  # array name (npz key without ".npy"; the input name for a .npy)
    dtype: np.dtype
    shape: tuple[int, ...]
    fortran: bool
    kind: str
    offset: int = 0  # byte offset of the array data in the file (mapped kinds)
    zip_name: str = ""  # member name inside the zip
    array: np.ndarray | None = None  # _MEMORY only
    crc: int | None = None  # an .npz member's CRC-32 (of its whole .npy bytes), from the zip directory


@dataclass
class _File:
    label: str  # how messages name it ("'data/a.npz'" or "arrays")
    path: str | None
    members: dict[str, _Member]  # keyed by model input name, after validation
    samples: int = 0
    start: int = 0  # global index of this file's first sample
    loaded: dict[str, np.ndarray] = field(default_factory=dict)


def _read_npy_header(fp: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fp)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(fp)
    reader = getattr(np.lib.format, "_read_array_header", None)
    if reader is None:  # pragma: no cover - numpy without the private helper
        raise ValueError(f"unsupported .npy format version {version}")
    return reader(fp, version)


def _check_dtype_storable(label: str, key: str, dtype: np.dtype) -> None:
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise BadInputError(
            f"calibration data {label} array '{key}' has dtype {dtype}, which is not a plain numeric "
            f"array; save plain numeric arrays (no objects, no structured dtypes)"
        )


def _nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return int(math.prod(shape)) * dtype.itemsize


def _scan_npy(path: str, label: str, key: str) -> _Member:
    try:
        with open(path, "rb") as fp:
            shape, fortran, dtype = _read_npy_header(fp)
            offset = fp.tell()
    except OSError as exc:
        raise BadInputError(f"cannot read calibration data {label}: {exc.strerror or exc}; "
                            "check the path and its permissions") from exc
    except Exception as exc:
        raise BadInputError(
            f"calibration data {label} is not a valid .npy file ({one_line(exc)}); write it again with numpy.save"
        ) from exc
    _check_dtype_storable(label, key, dtype)
    size = os.path.getsize(path)
    if offset + _nbytes(shape, dtype) > size:
        raise BadInputError(
            f"calibration data {label} is truncated (header says shape {tuple(shape)} {dtype}, "
            f"file has {size} bytes); write the file again"
        )
    return _Member(key=key, dtype=dtype, shape=tuple(shape), fortran=fortran, kind=_NPY, offset=offset)


def _scan_npz(path: str, label: str) -> list[_Member]:
    members: list[_Member] = []
    try:
        with zipfile.ZipFile(path) as zf, open(path, "rb") as raw:
            for info in zf.infolist():
                if info.is_dir():
                    continue
                key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                if any(m.key == key for m in members):  # numpy and bnfold could read different arrays
                    raise ValueError(f"it holds array '{key}' twice (two members named '{key}' or '{key}.npy')")
                with zf.open(info) as fp:
                    shape, fortran, dtype = _read_npy_header(fp)
                    header_len = fp.tell()
                shape = tuple(shape)
                _check_dtype_storable(label, key, dtype)
                if info.file_size < header_len + _nbytes(shape, dtype):
                    raise ValueError(f"member '{info.filename}' is shorter than its header says")
                if info.compress_type == zipfile.ZIP_STORED and not (info.flag_bits & 0x1):
                    raw.seek(info.header_offset)
                    local = raw.read(30)
                    if len(local) != 30 or local[:4] != b"PK\x03\x04":
                        raise ValueError(f"bad local header for member '{info.filename}'")
                    name_len, extra_len = struct.unpack("<HH", local[26:30])
                    data_start = info.header_offset + 30 + name_len + extra_len
                    members.append(
                        _Member(key, dtype, shape, fortran, _STORED, offset=data_start + header_len,
                                zip_name=info.filename, crc=info.CRC)
                    )
                else:
                    members.append(_Member(key, dtype, shape, fortran, _PACKED, zip_name=info.filename, crc=info.CRC))
    except BadInputError:
        raise
    except OSError as exc:
        if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise BadInputError(f"cannot read calibration data {label}: {exc.strerror or exc}; "
                                "check the path and its permissions") from exc
        raise BadInputError(f"calibration data {label} is not a valid .npz file ({one_line(exc)}); "
                            "write it again with numpy.savez") from exc
    except Exception as exc:
        raise BadInputError(
            f"calibration data {label} is not a valid .npz file ({one_line(exc)}); write it again with numpy.savez"
        ) from exc
    if not members:
        raise BadInputError(f"calibration data {label} holds no arrays; "
                            "save one array per model input with numpy.savez")
    return members


# --------------------------------------------------------------------------------------------
# validation against the model's inputs
# --------------------------------------------------------------------------------------------


def _floating(dt: np.dtype) -> bool:
    """A float dtype: numpy's, or bfloat16 (ml_dtypes, numpy kind 'V')."""
    return dt.kind == "f" or dt.name == "bfloat16"


def _dtype_rule(label: str, key: str, src: np.dtype, spec: InputSpec) -> None:
    """Error unless data of dtype ``src`` may feed input ``spec`` (cast per batch)."""
    dst = spec.dtype
    if src == dst:
        return
    ok = False
    if _floating(dst):
        ok = _floating(src)
    elif dst.kind in "iu":
        ok = src.kind in "iub"
    elif dst.kind == "b":
        ok = src.kind == "b"
    if not ok:
        raise BadInputError(
            f"calibration data {label} array '{key}' has dtype {src} but model input '{spec.name}' "
            f"is {dst}; save the data as {dst} (floating data may be any float type)"
        )


def _validate_file(label: str, members: list[_Member], inputs: Sequence[InputSpec]) -> _File:
    found = [m.key for m in members]
    by_key = {m.key: m for m in members}
    model = [s.name for s in inputs]
    for spec in inputs:
        if spec.name not in by_key:
            hint = (f"e.g. numpy.savez(path, {spec.name}=array)" if spec.name.isidentifier()
                    else "e.g. numpy.savez(path, **{name: array})")
            raise BadInputError(
                f"calibration data {label} has no array for model input '{spec.name}' (found: {_names(found)}); "
                f"name each array after a model input, {hint}"
            )
    extra = [k for k in found if k not in model]
    if extra:
        raise BadInputError(
            f"calibration data {label} has array(s) {_names(extra)} that are not model inputs (the model has: "
            f"{_names(model)}); remove them or name each array after a model input"
        )
    chosen: dict[str, _Member] = {}
    counts: dict[str, int] = {}
    for spec in inputs:
        m = by_key[spec.name]
        if len(m.shape) == 0:
            raise BadInputError(
                f"calibration data {label} array '{m.key}' is a scalar; give an array whose leading axis is samples"
            )
        if spec.shape is not None:
            if len(m.shape) != len(spec.shape):
                raise BadInputError(
                    f"calibration data {label} array '{m.key}' has rank {len(m.shape)} (shape {_fmt_shape(m.shape)}) "
                    f"but model input '{spec.name}' has rank {len(spec.shape)} {_fmt_shape(spec.shape)}; "
                    f"give one array of shape (samples, ...) matching the model input"
                )
            for axis in range(1, len(spec.shape)):
                want = spec.shape[axis]
                if want is not None and m.shape[axis] != want:
                    raise BadInputError(
                        f"calibration data {label} array '{m.key}' has shape {_fmt_shape(m.shape)} but model input "
                        f"'{spec.name}' expects {_fmt_shape(spec.shape)} (dim {axis} is {m.shape[axis]}, the model "
                        f"needs {want}); resize or reshape the data to the model's input shape"
                    )
        _dtype_rule(label, m.key, m.dtype, spec)
        chosen[spec.name] = m
        counts[spec.name] = m.shape[0]
    if len(set(counts.values())) > 1:
        listing = ", ".join(f"'{k}': {v}" for k, v in counts.items())
        raise BadInputError(
            f"calibration data {label} has different sample counts per input ({listing}); "
            f"give every input the same number of samples"
        )
    samples = next(iter(counts.values())) if counts else 0
    return _File(label=label, path=None, members=chosen, samples=samples)


def _check_inputs(inputs: Sequence[InputSpec]) -> list[InputSpec]:
    specs = list(inputs)
    if not specs:
        raise BadInputError("the model has no inputs to feed calibration data to; check the model file")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise BadInputError(f"model inputs have duplicate names ({_names(names)}); give each model input a unique name")
    return specs


# --------------------------------------------------------------------------------------------
# the data set
# --------------------------------------------------------------------------------------------


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _require_batch_memory(source: str, inputs: list[InputSpec], first: _File, batch: int, whole: bool) -> None:
    """Refuse, before a batch is copied out of the files, a batch whose input arrays alone (in the
    model's dtypes) do not fit in this machine's memory: one line with the batch size that would."""
    have = _physical_memory()
    per_sample = sum(math.prod(first.members[s.name].shape[1:]) * np.dtype(s.dtype).itemsize for s in inputs)
    if have is None or per_sample == 0 or batch * per_sample <= have:
        return
    fits = max(1, have // (8 * per_sample))  # room for the activations too
    what = f"all {batch} samples in one batch (no batch size given)" if whole else f"batches of {batch} samples"
    raise BadInputError(
        f"calibration data {source}: {what} need {batch * per_sample / 2**30:.3g} GiB for the inputs alone, more "
        f"than this machine's {have / 2**30:.3g} GiB of memory; pass a smaller --batch-size (batch_size=), "
        f"e.g. {fits}")


class CalibrationData:
    """Validated calibration samples, streamed in batches.

    Iterating yields one ``{input_name: array}`` dict per batch, in sample order; every array is
    a fresh C-contiguous copy whose dtype is the model input's dtype. The last batch may be short.
    Iteration can be repeated. Build instances with :func:`open_data` or :func:`from_arrays`.
    """

    num_samples: int
    batch_size: int
    #: what the data's reader passed over, one warning each (a data folder's subfolders)
    notes: tuple[str, ...] = ()

    def __init__(self, files: list[_File], inputs: list[InputSpec], batch_size: int | None, source: str) -> None:
        self._files = [f for f in files if f.samples > 0]
        self._inputs = inputs
        self.source = source
        start = 0
        for f in self._files:
            f.start = start
            start += f.samples
        self._starts = [f.start for f in self._files]
        self.num_samples = start
        if self.num_samples == 0:
            raise BadInputError(f"calibration data {source} has zero samples; give at least one sample per input")
        # sample shape must agree across files (batches concatenate across file boundaries)
        first = self._files[0]
        for f in self._files[1:]:
            for spec in inputs:
                a, b = first.members[spec.name].shape[1:], f.members[spec.name].shape[1:]
                if a != b:
                    raise BadInputError(
                        f"calibration data {f.label} array '{spec.name}' has per-sample shape {_fmt_shape(b)} but "
                        f"{first.label} has {_fmt_shape(a)}; every file must hold samples of the same shape"
                    )
        self.batch_size = self.num_samples if batch_size is None else int(batch_size)
        _require_batch_memory(source, inputs, first, min(self.batch_size, self.num_samples), batch_size is None)

    # -- protocol ----------------------------------------------------------------------------

    @property
    def inputs(self) -> tuple[InputSpec, ...]:
        return tuple(self._inputs)

    @property
    def num_batches(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self.batches_from(0, 1)

    def batches_from(self, start: int, step: int, stop: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Batches ``start``, ``start + step``, ... (before batch ``stop``, default all), built alone: a
        rank of a distributed run reads (and checks) only the samples of its own batches."""
        cache: dict[int, dict[str, np.ndarray]] = {}
        end = self.num_batches if stop is None else min(stop, self.num_batches)
        try:
            for index in range(start, end, step):
                lo = index * self.batch_size
                hi = min(lo + self.batch_size, self.num_samples)
                yield self._batch(lo, hi, index, cache)
        finally:
            cache.clear()

    def fingerprint(self) -> str:
        """A digest of what the data holds, cheap enough for every rank of a distributed run to
        compare before their statistics merge: per file its sample count, per array its dtype and
        shape, and its content checksum where the format keeps one (an .npz member's CRC-32, read
        from the zip directory), else the bytes of its first and last sample (a .npy is mapped:
        only those pages are read)."""
        h = hashlib.sha256()
        for i, f in enumerate(self._files):
            h.update(f"{f.samples}|".encode())
            arrays: dict[str, np.ndarray] | None = None
            for name, m in sorted(f.members.items()):
                h.update(f"{name}|{m.dtype.str}|{m.shape}|".encode("utf-8", "surrogatepass"))
                if m.crc is not None:
                    h.update(f"crc {m.crc}|".encode())
                    continue
                if arrays is None:
                    arrays = self._open_file(i)
                arr = arrays[name]
                if arr.shape[0]:
                    h.update(np.ascontiguousarray(arr[0]).tobytes())
                    h.update(np.ascontiguousarray(arr[-1]).tobytes())
        return h.hexdigest()

    def take(self, k: int) -> dict[str, np.ndarray]:
        """The first ``min(k, num_samples)`` samples as one batch (for verification)."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise BadInputError(f"number of samples to take must be at least 1, got {k!r}; ask for 1 or more samples")
        cache: dict[int, dict[str, np.ndarray]] = {}
        return self._batch(0, min(int(k), self.num_samples), 0, cache)

    def __repr__(self) -> str:
        return (
            f"CalibrationData(source={self.source}, samples={self.num_samples}, "
            f"batch_size={self.batch_size}, batches={self.num_batches}, files={len(self._files)})"
        )

    # -- internals ---------------------------------------------------------------------------

    def _open_file(self, i: int) -> dict[str, np.ndarray]:
        """The raw arrays of file ``i`` (memory maps where the format allows), keyed by input name."""
        f = self._files[i]
        out: dict[str, np.ndarray] = {}
        for name, m in f.members.items():
            if m.kind == _MEMORY:
                assert m.array is not None
                out[name] = m.array
            elif m.kind in (_NPY, _STORED) and _nbytes(m.shape, m.dtype) == 0:
                out[name] = np.empty(m.shape, dtype=m.dtype)
            elif m.kind in (_NPY, _STORED):
                assert f.path is not None  # only from_arrays' file has no path, and its members are _MEMORY
                try:
                    out[name] = np.memmap(
                        f.path, dtype=m.dtype, mode="r", offset=m.offset, shape=m.shape, order="F" if m.fortran else "C"
                    )
                except (OSError, ValueError) as exc:
                    raise BadInputError(
                        f"cannot map calibration data {f.label}: {one_line(exc)}; check the file") from exc
            else:
                assert f.path is not None  # only from_arrays' file has no path, and its members are _MEMORY
                try:
                    with zipfile.ZipFile(f.path) as zf, zf.open(m.zip_name) as fp:
                        arr = np.lib.format.read_array(fp, allow_pickle=False)
                except Exception as exc:
                    raise BadInputError(
                        f"calibration data {f.label} member '{m.zip_name}' cannot be read ({one_line(exc)}); "
                        f"the file is corrupted, write it again"
                    ) from exc
                if arr.shape != m.shape or arr.dtype != m.dtype:
                    raise BadInputError(
                        f"calibration data {f.label} member '{m.zip_name}' does not match its header; "
                        "write the file again"
                    )
                out[name] = arr
        return out

    def _arrays(self, i: int, cache: dict[int, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        if i not in cache:
            # keep only files the current position can still need: batches go forward
            for j in [j for j in cache if j < i]:
                del cache[j]
            cache[i] = self._open_file(i)
        return cache[i]

    def _batch(self, lo: int, hi: int, index: int, cache: dict[int, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        first = bisect.bisect_right(self._starts, lo) - 1
        pieces: dict[str, list[np.ndarray]] = {s.name: [] for s in self._inputs}
        i = first
        while i < len(self._files) and self._files[i].start < hi:
            f = self._files[i]
            a, b = max(lo, f.start) - f.start, min(hi, f.start + f.samples) - f.start
            arrays = self._arrays(i, cache)
            for spec in self._inputs:
                pieces[spec.name].append(self._piece(spec, f, arrays[spec.name], a, b, index))
            i += 1
        out: dict[str, np.ndarray] = {}
        for spec in self._inputs:
            parts = pieces[spec.name]
            arr = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
            out[spec.name] = np.ascontiguousarray(arr)
        return out

    def _piece(self, spec: InputSpec, f: _File, src: np.ndarray, a: int, b: int, index: int) -> np.ndarray:
        """Copy samples [a, b) of one file's array, cast to the input dtype, checked."""
        view = src[a:b]
        where = (
            f"in {f.label} samples {a}..{b - 1} (samples {f.start + a}..{f.start + b - 1} overall, batch {index})"
        )
        return cast_checked(spec, view, where)


def cast_checked(spec: InputSpec, arr: np.ndarray, where: str, verb: str = "save") -> np.ndarray:
    """A C-contiguous copy of ``arr`` in ``spec``'s dtype; a one-line :class:`BadInputError` (naming
    ``where``) for integers that do not fit it, NaN/Inf values, or floats that overflow it. ``verb``
    words the fix: "save" for files, "give" for a stream's batches."""
    dst = spec.dtype
    if dst.kind in "iu" and arr.dtype.kind in "iu" and not np.can_cast(arr.dtype, dst, "safe") and arr.size:
        info = np.iinfo(dst)
        vmin, vmax = int(arr.min()), int(arr.max())
        if vmin < info.min or vmax > info.max:
            raise BadInputError(
                f"calibration data for input '{spec.name}' has values in [{vmin}, {vmax}] {where} that do not fit "
                f"the model's {dst}; {verb} the data as {dst} or within its range"
            )
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.array(arr, dtype=dst, order="C", copy=True)
    if _floating(dst) and out.size and not np.isfinite(out).all():
        if _floating(arr.dtype) and not np.isfinite(arr).all():
            raise BadInputError(
                f"calibration data for input '{spec.name}' has NaN or Inf values {where}; remove or fix those samples")
        raise BadInputError(
            f"calibration data for input '{spec.name}' overflows the model's {dst} {where}; scale the data into the "
            f"{dst} range")
    return out


# --------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------


def _scan_file(path: str, label: str, inputs: list[InputSpec]) -> _File:
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".npy":
        if len(inputs) != 1:
            raise BadInputError(
                f"calibration data {label} is a .npy file, which holds one array, but the model has {len(inputs)} "
                f"inputs ({_names([s.name for s in inputs])}); use an .npz with one array per input name"
            )
        members = [_scan_npy(path, label, inputs[0].name)]
    elif suffix == ".npz":
        members = _scan_npz(path, label)
    else:
        raise BadInputError(
            f"calibration data {label} is not a .npz or .npy file or a directory; "
            f"save arrays with numpy.savez (.npz) or numpy.save (.npy)"
        )
    f = _validate_file(label, members, inputs)
    f.path = path
    return f


def open_data(path: str | os.PathLike, inputs: Sequence[InputSpec], batch_size: int | None) -> CalibrationData:
    """Open calibration data at ``path`` (``.npz``, ``.npy`` or a directory of them) for ``inputs``.

    Validates names, ranks, static dims, dtypes and sample counts from the file headers alone;
    values (NaN/Inf) are checked batch by batch while iterating. ``batch_size=None`` yields all
    samples as one batch. See the module docstring for how memory is used.
    """
    specs = _check_inputs(inputs)
    check_count(batch_size, "batch_size", optional=True, label="batch size")
    p = os.fspath(path)
    label = f"'{p}'"
    if not os.path.exists(p):
        raise BadInputError(f"calibration data {label} does not exist; check the path")
    if os.path.isdir(p):
        try:
            names = sorted(os.listdir(p))
        except OSError as exc:
            raise BadInputError(f"cannot read calibration data directory {label}: {exc.strerror or exc}; "
                                "check its permissions") from exc
        data_files = [
            n
            for n in names
            if not n.startswith(".")
            and os.path.splitext(n)[1].lower() in (".npz", ".npy")
            and os.path.isfile(os.path.join(p, n))
        ]
        if not data_files:
            raise BadInputError(
                f"calibration data directory {label} holds no .npz or .npy files; put the calibration arrays there "
                f"(read in sorted file-name order)"
            )
        files = [_scan_file(os.path.join(p, n), f"'{os.path.join(p, n)}'", specs) for n in data_files]
        notes = _skipped_folders(p, names)
    elif os.path.isfile(p):
        if not os.access(p, os.R_OK):
            raise BadInputError(f"cannot read calibration data {label}: permission denied; check its permissions")
        files = [_scan_file(p, label, specs)]
    else:
        raise BadInputError(f"calibration data {label} is not a file or a directory; "
                            "give a .npz, .npy or a directory of them")
    data = CalibrationData(files, specs, batch_size, label)
    if os.path.isdir(p):
        data.notes = notes
    return data


def _skipped_folders(folder: str, names: list[str]) -> tuple[str, ...]:
    """A warning naming the subfolders of a data folder, which are not read (only its own
    .npz/.npy files are), or nothing."""
    subs = [n for n in names if not n.startswith(".") and os.path.isdir(os.path.join(folder, n))]
    if not subs:
        return ()
    shown = ", ".join(repr(n) for n in subs[:3]) + (f" and {len(subs) - 3} more" if len(subs) > 3 else "")
    return (f"calibration data folder '{folder}': subfolder(s) {shown} not read (only the .npz/.npy files "
            "directly in the folder are); move their files up or point the data at them",)


def from_arrays(
    arrays: Mapping[str, np.ndarray], inputs: Sequence[InputSpec], batch_size: int | None
) -> CalibrationData:
    """Calibration data from in-memory arrays keyed by input name (the Python API's path).

    Same validation as :func:`open_data`; the arrays are not copied up front (each batch is).
    """
    specs = _check_inputs(inputs)
    check_count(batch_size, "batch_size", optional=True, label="batch size")
    if not isinstance(arrays, Mapping):
        raise BadInputError(
            f"calibration arrays must be a mapping of input name to array, got {type(arrays).__name__}; "
            f"pass {{'input_name': array}}"
        )
    label = "(arrays)"
    members = []
    for key, value in arrays.items():
        arr = np.asarray(value)
        _check_dtype_storable(label, str(key), arr.dtype)
        members.append(_Member(key=str(key), dtype=arr.dtype, shape=arr.shape, fortran=False, kind=_MEMORY, array=arr))
    f = _validate_file(label, members, specs)
    return CalibrationData([f], specs, batch_size, label)


def _is_mapped(arr: Any) -> bool:
    """True when ``arr`` (or an array it is a view of) is backed by a memory map."""
    seen = 0
    while arr is not None and seen < 64:
        if isinstance(arr, (np.memmap, mmap.mmap)):
            return True
        arr = getattr(arr, "base", None)
        seen += 1
    return False


class Batches(Protocol):
    """What the stages read from calibration data: ``CalibrationData``, or a view of it (such as
    its whole batches only, for a model with a fixed batch size), or a stream
    (:class:`bnfold.data.stream.StreamData`), whose ``num_batches`` is None (unknown) until a pass
    has ended and whose ``num_samples`` counts the samples read so far."""

    @property
    def batch_size(self) -> int: ...

    @property
    def num_samples(self) -> int: ...

    @property
    def num_batches(self) -> int | None: ...

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]: ...

    def take(self, k: int) -> dict[str, np.ndarray]: ...
