"""Stage 1: load an ONNX model from a path (or take a ModelProto) and write one back, atomically.

The file is read once: the same bytes are hashed (for the report) and parsed.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError, EncodeError

from .errors import BadInputError, UnsupportedModelError
from .serialize import write_model

# Protobuf cannot serialise a message of 2 GiB or more; stay clear of it.
_PROTO_LIMIT = 2**31 - 2**24


@dataclass
class LoadedModel:
    model: onnx.ModelProto
    path: Path | None
    sha256: str | None
    external_data: bool  # some tensors lived in external files


class _Hasher:
    """sha256 of a bytes object, computed on a thread (hashlib releases the GIL)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.hexdigest = ""

    def _run(self) -> None:
        self.hexdigest = hashlib.sha256(self._data).hexdigest()

    def __enter__(self) -> "_Hasher":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join()
        self._data = b""


def _uses_external_data(model: onnx.ModelProto) -> bool:
    return any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer
    )


def load_onnx(source: str | os.PathLike[str] | onnx.ModelProto) -> LoadedModel:
    """Read a model. Raises BadInputError for a missing, unreadable or non-ONNX file."""
    if isinstance(source, onnx.ModelProto):
        return LoadedModel(source, None, None, _uses_external_data(source))
    path = Path(source)
    if not path.exists():
        raise BadInputError(f"model file '{path}' not found; check the path")
    if not path.is_file():
        raise BadInputError(f"model path '{path}' is not a file; pass the .onnx file itself")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadInputError(f"cannot read model file '{path}': {exc.strerror or exc}") from exc
    model = onnx.ModelProto()
    with _Hasher(data) as hasher:  # hashes in a thread while protobuf parses
        try:
            model.ParseFromString(data)
        except (DecodeError, RuntimeError, ValueError) as exc:
            raise BadInputError(
                f"'{path}' is not an ONNX model (protobuf parse failed); pass an .onnx file"
            ) from exc
    digest = hasher.hexdigest
    del data
    if not model.HasField("graph") or (len(model.graph.node) == 0 and not model.opset_import):
        raise BadInputError(f"'{path}' is not an ONNX model (no graph found); pass an .onnx file")
    external = _uses_external_data(model)
    if external:
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except (OSError, ValueError) as exc:
            raise BadInputError(
                f"external data of '{path}' could not be read ({exc}); keep the data files next to the model"
            ) from exc
    return LoadedModel(model, path, digest, external)


def data_files(path: Path) -> list[Path]:
    """External-data files bnfold wrote for the model at ``path`` (``<name>.data``, ``<name>.<hex>.data``)."""
    return [p for p in path.parent.glob(f"{glob_escape(path.name)}.*data")
            if p.name == path.name + ".data" or (p.name.startswith(path.name + ".") and p.name.endswith(".data"))]


def glob_escape(name: str) -> str:
    import glob

    return glob.escape(name)


def remove_stale_data(path: Path, keep: str) -> None:
    """Delete data files of earlier writes of ``path`` once the new model is in place."""
    for p in data_files(path):
        if p.name != keep:
            try:
                p.unlink()
            except OSError:
                pass


def _ir_version_for_runtime(model: onnx.ModelProto) -> int:
    """Keep the model's IR version unless the installed onnxruntime would refuse it."""
    ir = model.ir_version or onnx.IR_VERSION
    if ir <= 10:  # accepted by every onnxruntime we support; no need to import it
        return ir
    from .verify.session import ort_max_ir_version

    return min(ir, ort_max_ir_version())


def prepare_for_save(model: onnx.ModelProto) -> None:
    # IR < 4 demands every initializer among the graph inputs; folding adds initializers, and
    # IR 4 only relaxes that rule, so such models are written as IR 4
    model.ir_version = max(_ir_version_for_runtime(model), 4)
    model.producer_name = "bnfold"
    from . import __version__

    model.producer_version = __version__


def save_onnx(
    model: onnx.ModelProto, path: str | os.PathLike[str], *, external_data: bool = False
) -> str:
    """Write ``model`` to ``path`` atomically; return the sha256 of the written model file.

    With ``external_data`` (or when the model is too large for one protobuf), tensors go to
    ``<name>.<hex>.data`` beside the model. Parent directories are created. Nothing is left
    behind on failure.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not external_data:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".bnfold-tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                digest = write_model(model, fh)  # streamed: no file-sized bytes object
            os.replace(tmp_name, path)
            return digest
        except (ValueError, EncodeError):  # over protobuf's 2 GiB limit: tensors go to an external file
            pass
        except OSError as exc:
            raise UnsupportedModelError(f"cannot write '{path}': {exc.strerror or exc}") from exc
        finally:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)
    tmpdir = Path(tempfile.mkdtemp(prefix=".bnfold-", dir=path.parent))
    try:
        tmp_model = tmpdir / path.name
        # a fresh data-file name per write: the old model never points at new data
        location = f"{path.name}.{os.urandom(4).hex()}.data"
        onnx.save_model(
            model,
            str(tmp_model),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=location,
            size_threshold=1024,
        )
        # the in-memory model now points at the file: read the tensors back (callers go on)
        onnx.load_external_data_for_model(model, str(tmpdir))
        data_file = tmpdir / location
        if data_file.exists():
            os.replace(data_file, path.parent / location)
        digest = hashlib.sha256(tmp_model.read_bytes()).hexdigest()
        os.replace(tmp_model, path)
        remove_stale_data(path, keep=location)
        return digest
    except OSError as exc:
        raise UnsupportedModelError(f"cannot write '{path}': {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
