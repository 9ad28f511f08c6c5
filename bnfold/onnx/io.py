"""Stage 1: load an ONNX model from a path (or take a ModelProto) and write one back, atomically.

The file is read once: the same bytes are hashed (for the report) and parsed.
"""
from __future__ import annotations

import hashlib
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from google.protobuf.message import DecodeError, EncodeError

from bnfold.errors import BadInputError, UnsupportedModelError
from bnfold.onnx import deferred, runtime, tensor_sizes  # runtime late-bound: tests replace runtime.ort_max_ir_version
from bnfold.onnx.serialize import _copy_except, write_model
from bnfold.outputs import Outputs
from bnfold.version import __version__

# Protobuf cannot serialise a message of 2 GiB or more; stay clear of it.
PROTO_LIMIT = 2**31 - 2**24


class _Hasher:
    """sha256 of a bytes object, computed on a thread (hashlib releases the GIL) while the model
    is parsed and folded; ``hexdigest()`` waits for it."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._digest = ""
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self._digest = hashlib.sha256(self._data).hexdigest()
        self._data = b""

    def hexdigest(self) -> str:
        self._thread.join()
        return self._digest


@dataclass
class LoadedModel:
    model: onnx.ModelProto
    path: Path | None
    digest: str | _Hasher | None  # sha256 of the file, or the thread computing it
    external_data: bool  # some tensors lived in external files
    locations: tuple[str, ...] = ()  # the external-data files named in the model file, as written there
    stamp: tuple = ()  # file_stamp() of the model file and its data files just after reading them

    @property
    def sha256(self) -> str | None:
        if isinstance(self.digest, _Hasher):
            self.digest = self.digest.hexdigest()
        return self.digest


def _uses_external_data(model: onnx.ModelProto) -> bool:
    return any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer
    )


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of ``graph``: initializers, tensor attributes, and those of subgraphs."""
    yield from graph.initializer
    for s in graph.sparse_initializer:  # indices too: either may be external
        yield from (s.values, s.indices)
    yield from _node_tensors(graph.node)


def _node_tensors(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.TensorProto]:
    """The tensors in the attributes of ``nodes``, subgraphs included."""
    for node in nodes:
        # Every node's attributes, whatever its operator: a file can give any node a tensor or graph
        # attribute (a Relu's), and onnx's loader and onnxruntime read its external data too.
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("sparse_tensor"):
                yield from (a.sparse_tensor.values, a.sparse_tensor.indices)
            for st in a.sparse_tensors:
                yield from (st.values, st.indices)
            if a.HasField("g"):
                yield from _all_tensors(a.g)
            for g in a.graphs:
                yield from _all_tensors(g)


def _model_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of ``model``: its graph's (``_all_tensors``) and those in the nodes of its
    local functions (onnxruntime inlines them and reads their external data)."""
    yield from _all_tensors(model.graph)
    for f in model.functions:
        yield from _node_tensors(f.node)


def _may_be_external(data: bytes, graph: onnx.GraphProto) -> bool:
    """False only where no tensor can be external: every external tensor names its file under the
    key "location", so a file without those bytes has none. The scan costs about 1 ns per byte
    and the walk in ``external_locations`` about 1 us per tensor or node: the scan is made only
    where it is the cheaper (many small tensors; a file of a few large ones is walked)."""
    if len(data) > 1000 * (len(graph.initializer) + len(graph.node)):
        return True
    return b"location" in data


def external_locations(model: onnx.ModelProto, path: Path | str = "the model") -> tuple[str, ...]:
    """The external-data files the model's tensors (subgraphs included) point at. A location with
    a NUL character is bad input (no file has such a name; C code would read a shorter name)."""
    found: dict[str, None] = {}
    for t in _model_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            for entry in t.external_data:
                if entry.key == "location":
                    if "\x00" in entry.value:
                        raise BadInputError(
                            f"'{path}': tensor '{t.name}' has an external-data location with a NUL character "
                            f"({entry.value!r}); the model file is corrupt: export or copy it again")
                    found[entry.value] = None
    return tuple(found)


def stamp_bytes(stamp: tuple) -> int | None:
    """Total size of the files in a ``file_stamp`` (None if there is none)."""
    return sum(entry[0] for entry in stamp) if stamp else None


def file_stamp(path: Path, locations: tuple[str, ...] = ()) -> tuple:
    """Size, modification time and inode of the model file and its data files: what tells that a
    file was replaced or rewritten since (() when one cannot be read)."""
    out = []
    for p in (path, *(path.parent / loc for loc in locations)):
        try:
            st = os.stat(p)
        except OSError:
            return ()
        out.append((st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev))
    return tuple(out)


def _read_file(path: Path) -> bytes:
    if not path.exists():
        raise BadInputError(f"model file '{path}' not found; check the path")
    if not path.is_file():
        raise BadInputError(f"model path '{path}' is not a file; pass the .onnx file itself")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BadInputError(f"cannot read model file '{path}': {exc.strerror or exc}") from exc


def _check_names(graph: onnx.GraphProto, path: Path) -> None:
    """Protobuf hands a string field that is not valid UTF-8 back as bytes (a byte flip in a
    name): bad input here rather than a TypeError or UnicodeDecodeError deep in a stage."""
    for where, names in (("graph input", (v.name for v in graph.input)),
                         ("graph output", (v.name for v in graph.output)),
                         ("initializer", (t.name for t in graph.initializer))):
        for name in names:
            if not isinstance(name, str):
                raise BadInputError(f"'{path}': a {where} name is not valid UTF-8 ({name!r}); the model file is "
                                    "corrupt: export or copy it again")
    for k, node in enumerate(graph.node):
        fields = [node.name, node.op_type, node.domain, *node.input, *node.output,
                  *(a.name for a in node.attribute)]
        if not all(isinstance(f, str) for f in fields):
            raise BadInputError(f"'{path}': node #{k} has a name, input, output or attribute name that is not valid "
                                "UTF-8; the model file is corrupt: export or copy it again")
        for a in node.attribute:
            if a.HasField("g"):
                _check_names(a.g, path)
            for g in a.graphs:
                _check_names(g, path)


def _is_safetensors(data: bytes) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then that many bytes of JSON."""
    if len(data) < 10:
        return False
    n = int.from_bytes(data[:8], "little")
    return 2 <= n <= len(data) - 8 and data[8:9] == b"{" and data[8 + n - 1:8 + n].rstrip() in (b"}", b"")


def _parse(data: bytes, path: Path) -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        if _is_safetensors(data):
            raise BadInputError(
                f"'{path}' is a safetensors file (weights only, no model): pass an .onnx file, or for a PyTorch "
                "model build it with bnfold fold --model-factory MODULE:CALLABLE --weights FILE") from exc
        raise BadInputError(
            f"'{path}' is not an ONNX model (protobuf parse failed); pass an .onnx file"
        ) from exc
    if not model.HasField("graph") or (len(model.graph.node) == 0 and not model.opset_import):
        raise BadInputError(f"'{path}' is not an ONNX model (no graph found); pass an .onnx file")
    _check_names(model.graph, path)
    return model


def load_onnx(source: str | os.PathLike[str] | onnx.ModelProto) -> LoadedModel:
    """Read a model. Raises BadInputError for a missing, unreadable or non-ONNX file, for external
    data that cannot be read from the model's folder, and for a tensor whose data does not match
    its declared shape (``tensor_sizes``)."""
    if isinstance(source, onnx.ModelProto):
        tensor_sizes.check(_model_tensors(source), "the model", {})
        return LoadedModel(source, None, None, _uses_external_data(source))
    path = Path(source)
    data = _read_file(path)
    hasher = _Hasher(data)  # on a thread, while protobuf parses and bnfold folds
    model = _parse(data, path)
    locations = external_locations(model, path) if _may_be_external(data, model.graph) else ()
    del data
    external = bool(locations) and _uses_external_data(model)  # initializers: the output keeps them external
    sources: dict[str, str] = {}
    if locations:  # every external tensor (Constant nodes and subgraphs too), against the model's folder
        sources = _external_sources(model)
        try:
            _load_external_data(model, str(path.parent))
        except (OSError, ValueError, onnx.checker.ValidationError) as exc:
            raise BadInputError(
                f"external data of '{path}' could not be read ({exc}); keep the data files next to the model"
            ) from exc
    tensor_sizes.check(_model_tensors(model), path, sources)
    return LoadedModel(model, path, hasher, external, locations, file_stamp(path, locations))


def read_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """The model at ``path`` without its external data (as ``onnx.load(path, load_external_data=False)``),
    with ``load_onnx``'s checks and messages: a missing, unreadable or non-ONNX file, a tensor whose
    data does not match its declared shape, and an external-data file that is missing, outside the
    model's folder (onnx's rules) or shorter than its tensors are ``BadInputError``. No tensor
    data is read from the external files (for ``verify``, where onnxruntime reads them)."""
    path = Path(path)
    model = _parse(_read_file(path), path)
    external_locations(model, path)  # the NUL check
    tensor_sizes.check(_model_tensors(model), path, {})
    if deferred.supported():  # else onnx has no resolver to ask: onnxruntime checks them
        for t in _model_tensors(model):
            if t.data_location == onnx.TensorProto.EXTERNAL:
                tensor_sizes.check_external(t, path)
    return model


def model_files(path: str | os.PathLike[str]) -> list[Path]:
    """The model file at ``path`` and the external-data files its tensors name (resolved against its
    folder; those that exist). What a run must never overwrite or delete."""
    path = Path(path)
    try:
        locations = external_locations(_parse(_read_file(path), path), path)
    except BadInputError:
        locations = ()
    return [path, *(path.parent / loc for loc in locations if (path.parent / loc).exists())]


def _external_sources(model: onnx.ModelProto) -> dict[str, str]:
    """Tensor name -> location of the external tensors, for messages once the data is loaded."""
    out: dict[str, str] = {}
    for t in _model_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            out[t.name] = next((e.value for e in t.external_data if e.key == "location"), "")
    return out


def _load_external_data(model: onnx.ModelProto, base_dir: str) -> None:
    """``onnx.load_external_data_for_model``, in the same order and with the same errors, except
    that large main-graph initializers are checked but left in their file (``deferred.defer``)."""
    if not deferred.supported():
        onnx.load_external_data_for_model(model, base_dir)
        _load_the_rest(model, base_dir)
        return
    left: list[onnx.TensorProto] = []
    try:
        for t in model.graph.initializer:  # onnx's loader starts with these, in this order
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            if deferred.defer(t, base_dir):
                t.data_location = onnx.TensorProto.DEFAULT  # hidden from the loader below
                left.append(t)
            else:
                onnx.external_data_helper.load_external_data_for_tensor(t, base_dir)
        onnx.load_external_data_for_model(model, base_dir)  # subgraphs and attributes
        _load_the_rest(model, base_dir)
    finally:
        for t in left:
            t.data_location = onnx.TensorProto.EXTERNAL


def _load_the_rest(model: onnx.ModelProto, base_dir: str) -> None:
    """External tensors onnx's loader leaves external: the values of sparse initializers and sparse
    tensor attributes (main graph and subgraphs). Read against the model's folder like the others,
    else they would be read later against whatever folder the model is written to."""
    for t in _model_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            onnx.external_data_helper.load_external_data_for_tensor(t, base_dir)


# The first bytes of every data file bnfold writes (its tensors start at DATA_ALIGN): what makes a data
# file provably bnfold's, so that the cleanup after a write never deletes a file someone else wrote.
DATA_MAGIC = b"BNFOLD external data: tensors of an ONNX model written by bnfold\n"
# The longest file name most file systems take (ext4, xfs, btrfs, tmpfs, APFS: 255 bytes).
NAME_MAX = 255


def data_prefix(name: str) -> str:
    """The start of the data-file names of a model written as ``name``: the name itself, or, when
    ``<name>.<8 hex>.data`` would be too long a file name, its first bytes and a hash of it."""
    if len(os.fsencode(name)) + 14 <= NAME_MAX:
        return name
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:8]
    cut = name.encode("utf-8", "surrogateescape")[: NAME_MAX - 14 - 9].decode("utf-8", "ignore")
    return f"{cut}~{digest}"


def _is_ours(path: Path) -> bool:
    try:
        if not path.is_file() or path.is_symlink():
            return False
        with open(path, "rb") as fh:
            return fh.read(len(DATA_MAGIC)) == DATA_MAGIC
    except OSError:
        return False


def stale_data_files(path: Path, keep: str = "") -> list[Path]:
    """The data files of earlier bnfold writes of the model at ``path``: named
    ``<data_prefix(name)>.<8 hex>.data``, regular files, starting with :data:`DATA_MAGIC`; ``keep``
    (the current one) excluded. Nothing else in the folder is ever listed."""
    pattern = re.compile(re.escape(data_prefix(path.name)) + r"\.[0-9a-f]{8}\.data\Z")
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    return [path.parent / n for n in names if pattern.match(n) and n != keep and _is_ours(path.parent / n)]


def remove_stale_data(path: Path, keep: str = "", skip: Callable[[Path], object] | None = None) -> None:
    """Delete the data files of earlier writes of ``path`` (see :func:`stale_data_files`) once the
    new model is in place; not those ``skip`` names (an input model's data: a copied or renamed
    earlier output may still point at one)."""
    for p in stale_data_files(path, keep):
        if skip is not None and skip(p):
            continue
        try:
            p.unlink()
        except OSError:
            pass


def _ir_version_for_runtime(model: onnx.ModelProto) -> int:
    """Keep the model's IR version unless the installed onnxruntime would refuse it."""
    ir = model.ir_version or onnx.IR_VERSION
    if ir <= 10:  # accepted by every onnxruntime we support; no need to import it
        return ir
    return min(ir, runtime.ort_max_ir_version())


def ir_version_for_save(model: onnx.ModelProto) -> int:
    """The IR version ``prepare_for_save`` writes."""
    # IR < 4 demands every initializer among the graph inputs; folding adds initializers, and
    # IR 4 only relaxes that rule, so such models are written as IR 4
    return max(_ir_version_for_runtime(model), 4)


def prepare_for_save(model: onnx.ModelProto) -> None:
    model.ir_version = ir_version_for_save(model)
    model.producer_name = "bnfold"
    model.producer_version = __version__


def _create_new(folder: Path, prefix: str) -> tuple[int, str]:
    """A new temporary file in ``folder`` with the permission bits of any new file (0o666 minus the
    umask; ``mkstemp`` would give 0o600, which the rename would carry over to the model). Its name
    starts with ``prefix``, cut to keep the name within :data:`NAME_MAX`."""
    prefix = prefix.encode("utf-8", "surrogateescape")[:200].decode("utf-8", "ignore")
    for _ in range(100):
        name = os.path.join(folder, f".{prefix}.{os.urandom(4).hex()}.bnfold-tmp")
        try:
            return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), name
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary file name in '{folder}'")


@dataclass(frozen=True)
class Written:
    """A model :func:`write_onnx` wrote: its path, the sha256 of the model file, and its data file."""

    path: Path
    sha256: str
    data: Path | None = None


def write_onnx(
    model: onnx.ModelProto, path: Path, *, name: str | None = None, external_data: bool = False,
    size_hint: int | None = None,
) -> Written:
    """Write ``model`` to ``path`` (a temporary file, then a rename); nothing else is touched.

    With ``external_data`` (or when the model is too large for one protobuf), tensors go to a
    fresh ``<data_prefix(name)>.<hex>.data`` beside ``path`` (see ``_save_external``); ``name`` is
    the file name the model will finally have (default: ``path``'s), since the model refers to its
    data file by name. ``model`` is not modified. Nothing is left behind on failure.
    ``size_hint``: about the model's size in bytes, if known (``write_model``). Callers publish
    through :class:`bnfold.outputs.Outputs`
    (``save_onnx``, ``bnfold.onnx.staging``).
    """
    name = name or path.name
    if not external_data and not deferred.has_deferred(model.graph.initializer):
        fd, tmp_name = _create_new(path.parent, "model")
        try:
            with os.fdopen(fd, "wb") as fh:
                digest = write_model(model, fh, size_hint)  # large tensors streamed
            os.replace(tmp_name, path)
            return Written(path, digest)
        except (ValueError, EncodeError):  # over protobuf's 2 GiB limit: tensors go to an external file
            pass
        finally:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)
    return _save_external(model, path, name)


def save_onnx(
    model: onnx.ModelProto, path: str | os.PathLike[str], *, external_data: bool = False,
    size_hint: int | None = None,
) -> str:
    """Write ``model`` to ``path`` atomically (staged, then moved into place with its data file, see
    :class:`bnfold.outputs.Outputs`); return the sha256 of the written model file. Data files of
    earlier bnfold writes of ``path`` are deleted once the new model is in place. Parent
    directories are created."""
    path = Path(path)
    with Outputs() as outputs:
        staged = outputs.path_for(path)
        written = _write_or_fail(model, staged, path, external_data=external_data, size_hint=size_hint)
        publish_model(outputs, path, written)
        outputs.commit()
    return written.sha256


def _write_or_fail(model: onnx.ModelProto, staged: Path, target: Path, **kw: Any) -> Written:
    try:
        return write_onnx(model, staged, name=target.name, **kw)
    except OSError as exc:
        raise UnsupportedModelError(f"cannot write '{target}': {exc.strerror or exc}") from exc
    except UnsupportedModelError as exc:  # the size limit: name the user's path, not the staged one
        raise UnsupportedModelError(str(exc).replace(str(staged), str(target))) from exc


def stage_model(outputs: Outputs, model: onnx.ModelProto, target: Path, **kw: Any) -> Written:
    """Write ``model`` for ``target`` into ``outputs``' staging folder (not yet registered)."""
    return _write_or_fail(model, outputs.path_for(target), target, **kw)


def publish_model(outputs: Outputs, target: Path, written: Written) -> None:
    """Register a staged model (and its data file) to become ``target`` on ``outputs.commit()``;
    stale data files of earlier writes of ``target`` go once it is in place."""
    keep = written.data.name if written.data is not None else ""
    outputs.add(target, written.path, companions=[written.data] if written.data is not None else [],
                cleanup=lambda p, skip: remove_stale_data(p, keep=keep, skip=skip))


# Large tensors go to the data file; this is onnx's default threshold too.
EXTERNAL_MIN_BYTES = 1024
# Offsets of tensors in the data file are multiples of this (onnxruntime can map them directly).
DATA_ALIGN = 4096
_ZEROS = bytes(DATA_ALIGN)


def _set_external(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _save_external(model: onnx.ModelProto, path: Path, name: str) -> Written:
    """Write ``model`` with its large tensors in a fresh ``<data_prefix(name)>.<8 hex>.data`` beside
    ``path``.

    ``model`` is never modified (``onnx.save_model(save_as_external_data=True)`` rewrites the
    model to point at the file, and reading the weights back costs a full copy that protobuf's
    arena keeps). Instead a skeleton is built: every field of the model except the main graph's
    initializers, then one initializer at a time either copied inline or, when it holds at least
    ``EXTERNAL_MIN_BYTES`` of ``raw_data`` and is not external already, written to the data file
    at a ``DATA_ALIGN``-aligned offset and added to the skeleton as a copy without ``raw_data``
    that points there. Only the main graph's initializers move: tensors inside subgraphs (If/Loop
    bodies), Constant nodes, sparse initializers and tensors stored in typed fields (float_data,
    ...) stay inline in the model file. The extra memory is one tensor and the skeleton. The data
    file starts with :data:`DATA_MAGIC` (its first tensor at offset ``DATA_ALIGN``), which marks it
    as bnfold's for a later cleanup.

    The data file is written first (temporary name, then rename), then the model. Returns what
    was written.
    """
    folder = path.parent
    # a fresh data-file name per write: the old model never points at new data
    location = f"{data_prefix(name)}.{os.urandom(4).hex()}.data"
    skeleton = onnx.ModelProto()
    _copy_except(model, skeleton, "graph")
    graph = skeleton.graph
    _copy_except(model.graph, graph, "initializer")
    data_tmp = model_tmp = ""
    placed = False
    try:
        offset = 0
        fh = None
        try:
            for t in model.graph.initializer:
                lazy = deferred.is_deferred(t)  # copied from its file in chunks, never held whole
                raw = t.raw_data if not lazy and t.data_location != onnx.TensorProto.EXTERNAL \
                    and t.HasField("raw_data") else b""
                if not lazy and len(raw) < EXTERNAL_MIN_BYTES:
                    del raw
                    graph.initializer.add().CopyFrom(t)
                    continue
                if fh is None:
                    fd, data_tmp = _create_new(folder, "data")
                    fh = os.fdopen(fd, "wb")
                    fh.write(DATA_MAGIC)
                    offset = len(DATA_MAGIC)
                pad = -offset % DATA_ALIGN
                if pad:
                    fh.write(_ZEROS[:pad])
                    offset += pad
                if lazy:
                    length = deferred.copy_to(t, fh)
                else:
                    fh.write(raw)
                    length = len(raw)
                del raw
                head = graph.initializer.add()
                _copy_except(t, head, "raw_data")
                del head.external_data[:]
                _set_external(head, location, offset, length)
                offset += length
        finally:
            if fh is not None:
                fh.close()
        try:
            size = skeleton.ByteSize()
        except (ValueError, EncodeError):
            size = None
        if size is None or size > PROTO_LIMIT:
            raise UnsupportedModelError(
                f"cannot write '{path}': the model is over protobuf's 2 GiB limit even with its initializers in "
                "external data (large Constant nodes, subgraph tensors or tensors without raw_data stay in the "
                "model file); store those weights as initializers")
        try:
            data = skeleton.SerializeToString()
        except (ValueError, EncodeError) as exc:
            raise UnsupportedModelError(
                f"cannot write '{path}': the model is over protobuf's 2 GiB limit even with its initializers in "
                "external data") from exc
        del skeleton, graph
        digest = hashlib.sha256(data).hexdigest()
        fd, model_tmp = _create_new(folder, "model")
        with os.fdopen(fd, "wb") as mf:
            mf.write(data)
        del data
        data_path = folder / location if data_tmp else None
        if data_tmp:
            os.replace(data_tmp, folder / location)
            data_tmp = ""
            placed = True
        os.replace(model_tmp, path)
        model_tmp = ""
        placed = False
        return Written(path, digest, data_path)
    finally:
        for tmp in (data_tmp, model_tmp):
            if tmp and os.path.exists(tmp):
                os.unlink(tmp)
        if placed:  # the model did not move into place: leave the folder as it was
            (folder / location).unlink(missing_ok=True)
