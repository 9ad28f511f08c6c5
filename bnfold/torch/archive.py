"""No code runs from an ExportedProgram archive (``.pt2``) unless the caller trusts it (issue 14).

``torch.export.load`` (torch 2.13) reads these members of the archive, per model ``NAME`` (one
``models/NAME.json`` each; the other members are JSON or raw tensor bytes, never unpickled):

* ``data/sample_inputs/NAME.pt``: the example inputs, a ``torch.save`` file. torch tries
  ``torch.load(weights_only=True)`` and on failure falls back to ``weights_only=False``
  (``deserialize_torch_artifact``: "Fallback to weights_only=False succeeded", then a broken log
  call prints a ``--- Logging error ---`` traceback): a ``__reduce__`` payload runs.
* ``data/weights/W`` and ``data/constants/tensor_*`` whose config entry (``*_config.json``) has
  ``use_pickle`` (tensor subclasses): ``torch.load(weights_only=False)``, no first try.
* ``data/constants/custom_obj_*`` (torchbind objects, ``torch._C._pickle_load_obj``) and
  ``data/constants/opaque_obj_*`` (plain ``pickle.loads``).
* legacy ``data/weights/NAME.pt`` / ``data/constants/NAME.pt``: the same fallback as the inputs.
* anything under ``data/aotinductor/``: compiled AOTInductor code that ``load_pt2`` loads as a
  shared library (native code), not a pickle.
* the pre-2.7 layout, read with Python's ``zipfile`` whenever the new layout fails with a
  RuntimeError: ``serialized_state_dict.pt``, ``serialized_constants.pt``,
  ``serialized_example_inputs.pt`` (and the ``.json`` twins of the first two), all with the same
  fallback.

:func:`check_exported_program` reads the archive's bytes (once, in memory: what is checked is
what is loaded) with torch's own zip reader and refuses, naming the member, every archive where
one of these would need more than ``torch.load(weights_only=True)``.
:func:`guarded_export_load` then loads the same bytes with ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1``
(every ``torch.load`` inside, even one passing ``weights_only=False``, stays restricted, so torch's
fallback can never unpickle code) and torch's export loggers muted (no "Logging error"
traceback, no warnings on stderr). The variable is set for the duration of the call, process-wide.

Not a pickle, but code all the same: the graph deserializer resolves an ``as_operator`` argument
as any attribute chain under ``torch`` (``torch.save``, ``torch.os.mkdir``), and
``wrap_with_set_grad_enabled`` calls its function argument. torch 2.13's fx code generation
cannot render such an argument (SyntaxError), so ``module()`` never runs it, but
``torch.fx.Interpreter`` does; :func:`check_graph_callables` refuses such a graph after loading.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bnfold.errors import BadInputError, one_line
from bnfold.torch.script_code import FILE_OPS, FOREIGN_NAMESPACES, ScriptFinding, find_file_op

__all__ = ["FILE_OPS", "FOREIGN_NAMESPACES", "ScriptFinding", "UnsafeMember", "check_exported_program",
           "check_graph_callables", "check_torchscript_code",
           "guarded_export_load", "quiet_export_loggers", "unsafe_hint"]

# the archive layout (torch.export.pt2_archive.constants in torch 2.13; tests compare them)
MODELS_DIR = "models/"
SAMPLE_INPUTS = "data/sample_inputs/{}.pt"
WEIGHTS_DIR = "data/weights/"
CONSTANTS_DIR = "data/constants/"
WEIGHTS_CONFIG = "data/weights/{}_weights_config.json"
CONSTANTS_CONFIG = "data/constants/{}_constants_config.json"
TENSOR_CONSTANT_PREFIX = "tensor_"
AOTINDUCTOR_DIR = "data/aotinductor/"
ARCHIVE_FORMAT = "archive_format"
#: members of the pre-2.7 layout that torch.export.load unpickles (with the fallback)
LEGACY_PICKLES = ("serialized_state_dict.pt", "serialized_constants.pt", "serialized_example_inputs.pt",
                  "serialized_state_dict.json", "serialized_constants.json")
#: the loggers whose records torch.export.load emits (the fallback's broken log call among them)
EXPORT_LOGGERS = ("torch.export", "torch.export.pt2_archive._package", "torch._export.serde.serialize")

_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_FORCE_NO = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


@dataclass(frozen=True)
class UnsafeMember:
    """A member of the archive that only full unpickling (or native code loading) can read."""

    member: str  # its name inside the archive
    what: str  # what torch reads it as
    why: str  # the restricted unpickler's reason, or why it is never read safely

    def message(self, path: Path) -> str:
        return (f"'{path}': member '{self.member}' ({self.what}) needs more than torch.load(weights_only=True) "
                f"({self.why}); reading it runs code from the file, so bnfold refuses the archive; "
                + unsafe_hint())


def unsafe_hint() -> str:
    """The fix, in the library's words (the CLI shows ``--unsafe-pickle``)."""
    return "pass unsafe_pickle=True only if you trust the file"


def _refusal_reason(exc: BaseException) -> str | None:
    """The restricted unpickler's reason where ``exc`` is a weights-only refusal, else None."""
    text = " ".join(str(exc).split())
    if "weights only" not in text.lower() and "weightsunpickler" not in text.lower():
        return None
    found = re.search(r"WeightsUnpickler error: (.*?)(?: was not an allowed| Please|\. |$)", text)
    return one_line(ValueError(found.group(1)), 160) if found else "not a plain tensor file"


def _weights_only(data: bytes, member: str, what: str, path: Path) -> UnsafeMember | None:
    """None where ``torch.load(weights_only=True)`` reads ``data``; the refusal where it needs more;
    BadInputError where it is no torch.save file at all."""
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a broken file
        why = _refusal_reason(exc)
        if why is None:
            raise BadInputError(f"cannot load ExportedProgram '{path}': member '{member}' ({what}) is not a "
                                f"readable torch.save file: {one_line(exc, 200)}") from None
        return UnsafeMember(member, what, why)
    return None


class _Archive:
    """The archive's members as torch's own zip reader (``torch._C.PyTorchFileReader``) sees them."""

    def __init__(self, data: bytes, path: Path) -> None:
        self.path = path
        self.reader = torch._C.PyTorchFileReader(io.BytesIO(data))
        self.names = set(self.reader.get_all_records())

    def read(self, name: str) -> bytes:
        try:
            value = self.reader.get_record(name)
        except Exception as exc:  # noqa: BLE001 - a missing or broken record
            raise BadInputError(f"cannot load ExportedProgram '{self.path}': cannot read member '{name}': "
                                f"{one_line(exc, 160)}") from None
        assert isinstance(value, bytes)  # torch: get_record returns the record's bytes
        return value

    def config(self, name: str) -> dict[str, Any]:
        """A payload config (``{"config": {fqn: {"path_name": ..., "use_pickle": ...}}}``), checked
        to be that shape (torch parses the same JSON)."""
        try:
            parsed = json.loads(self.read(name))
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            raise BadInputError(f"cannot load ExportedProgram '{self.path}': member '{name}' is not JSON: "
                                f"{one_line(exc, 160)}") from None
        entries = parsed.get("config") if isinstance(parsed, dict) else None
        if not isinstance(entries, dict) or not all(
                isinstance(e, dict) and isinstance(e.get("path_name"), str) for e in entries.values()):
            raise BadInputError(f"cannot load ExportedProgram '{self.path}': member '{name}' is not a payload "
                                "config (a 'config' map of entries with a 'path_name')")
        return entries


def _model_members(archive: _Archive, model: str) -> Iterator[UnsafeMember | None]:
    """Check each member of ``model`` that torch.export.load unpickles."""
    path = archive.path
    sample = SAMPLE_INPUTS.format(model)
    yield _weights_only(archive.read(sample), sample, "sample inputs", path)
    legacy = f"{WEIGHTS_DIR}{model}.pt"
    if legacy in archive.names:
        yield _weights_only(archive.read(legacy), legacy, "legacy weights", path)
    else:
        for fqn, entry in archive.config(WEIGHTS_CONFIG.format(model)).items():
            if entry.get("use_pickle") is not False:  # torch unpickles it where the flag is truthy
                member = WEIGHTS_DIR + entry["path_name"]
                yield _weights_only(archive.read(member), member, f"pickled weight '{fqn}'", path)
    legacy = f"{CONSTANTS_DIR}{model}.pt"
    if legacy in archive.names:
        yield _weights_only(archive.read(legacy), legacy, "legacy constants", path)
        return
    for fqn, entry in archive.config(CONSTANTS_CONFIG.format(model)).items():
        member = CONSTANTS_DIR + entry["path_name"]
        if not entry["path_name"].startswith(TENSOR_CONSTANT_PREFIX):
            # custom_obj_* (torchbind unpickler), opaque_obj_* (pickle.loads), or unknown
            yield UnsafeMember(member, f"constant '{fqn}'", "a custom or opaque object, read by full unpickling")
        elif entry.get("use_pickle") is not False:
            yield _weights_only(archive.read(member), member, f"pickled constant '{fqn}'", path)


def _legacy_layout(data: bytes, path: Path) -> Iterator[UnsafeMember | None]:
    """The pre-2.7 layout, which torch.export.load tries whenever its zip reader or the new layout
    fails with a RuntimeError: read with Python's zipfile, every entry of the listed names."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for info in zf.infolist():
                if info.filename in LEGACY_PICKLES:
                    yield _weights_only(zf.read(info), info.filename, "serialized artifact", path)
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, ValueError) as exc:
        raise BadInputError(f"cannot load ExportedProgram '{path}': {one_line(exc, 200)}") from None


#: a zip member that inflates to more than this many times the bytes it is stored in, and to more
#: than _BOMB_MIN_BYTES, is a zip bomb: torch.save / torch.export.save / torch.jit.save store their
#: members uncompressed, and both zip readers allocate a member's declared size when they read it
_BOMB_RATIO = 100
_BOMB_MIN_BYTES = 64 << 20


def check_inflation(source: bytes | Path, path: Path, what: str) -> None:
    """BadInputError where the zip archive ``source`` (its bytes, or a file) declares members that
    would inflate to many times the file (a zip bomb: a few MB that read as GBs), checked from the
    zip's directory before any member is read. Not a zip Python reads: nothing to check here."""
    try:
        with zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, RuntimeError, ValueError):
        return
    declared = sum(i.file_size for i in infos)
    stored = sum(i.compress_size for i in infos)
    if declared > _BOMB_MIN_BYTES and declared > _BOMB_RATIO * max(stored, 1):
        worst = max(infos, key=lambda i: i.file_size)
        raise BadInputError(
            f"{what} '{path}' is a zip archive whose members declare {declared} bytes stored in {stored} "
            f"(e.g. '{worst.filename}': {worst.file_size} bytes from {worst.compress_size}), more than "
            f"{_BOMB_RATIO}x: a zip bomb, not a torch.save file (torch stores members uncompressed); "
            "save the model again with torch")


def check_exported_program(data: bytes, path: Path) -> UnsafeMember | None:
    """The first member of the archive ``data`` (read from ``path``) that needs full unpickling or
    loads native code, or None where ``torch.export.load`` can read it all with
    ``weights_only=True``. BadInputError where the archive is broken.

    Both layouts are checked: torch falls back to the pre-2.7 one (Python's zipfile) after any
    RuntimeError in the new one (torch's own zip reader, which may see other members)."""
    legacy = next((u for u in _legacy_layout(data, path) if u is not None), None)
    if legacy is not None:
        return legacy
    try:
        archive = _Archive(data, path)
    except Exception:  # noqa: BLE001 - torch's reader refuses it: torch reads the pre-2.7 layout only
        return None
    if ARCHIVE_FORMAT not in archive.names:
        return None
    aoti = sorted(n for n in archive.names if n.startswith(AOTINDUCTOR_DIR))
    if aoti:
        return UnsafeMember(aoti[0], "AOTInductor compiled code",
                            "torch.export.load loads it as a native shared library")
    # torch takes every member under models/ for a model and cuts ".json"'s length off its name
    models = sorted(n[len(MODELS_DIR):-len(".json")] for n in archive.names if n.startswith(MODELS_DIR))
    for model in models:
        found = next((u for u in _model_members(archive, model) if u is not None), None)
        if found is not None:
            return found
    return None


#: modules whose plain functions an honest graph passes as arguments (torch's own sym ops)
_HARMLESS_MODULES = ("_operator", "operator", "math")


def _foreign_callable(value: Any) -> bool:
    """A Python callable in a graph argument that is no torch operator: the deserializer resolves
    an ``as_operator`` string as any attribute chain under ``torch`` (``torch.os.mkdir``,
    ``torch.save``), and a higher-order op like ``wrap_with_set_grad_enabled`` calls it."""
    if not callable(value) or isinstance(value, (torch.fx.Node, torch.nn.Module, torch.dtype)):
        return False
    if isinstance(value, (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator)):
        return False
    return getattr(value, "__module__", None) not in _HARMLESS_MODULES


def _file_op(target: Any) -> bool:
    if not isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return False
    schema_name = str(getattr(target, "_schema", None) and target._schema.name)  # 'aten::from_file'
    namespace, _, name = schema_name.partition("::")
    return namespace in FOREIGN_NAMESPACES or name in FILE_OPS


def check_graph_callables(ep: Any, path: Path) -> None:
    """BadInputError where a node of the loaded ExportedProgram (or a subgraph) passes a Python
    callable other than a torch operator as an argument: running the graph would call it."""
    for module in ep.graph_module.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            leaves: list[Any] = []
            torch.fx.node.map_aggregate((node.args, node.kwargs), leaves.append)
            found = [v for v in leaves if _foreign_callable(v)]
            if _file_op(node.target):
                raise BadInputError(
                    f"'{path}': graph node '{node.name}' calls {node.target}, which opens files or connections; "
                    "running the model would call it, so bnfold refuses the archive; " + unsafe_hint())
            if found:
                name = getattr(found[0], "__qualname__", None) or type(found[0]).__name__
                raise BadInputError(
                    f"'{path}': graph node '{node.name}' passes the Python callable "
                    f"{getattr(found[0], '__module__', '?')}.{name} as an argument; running the model would call it, "
                    "so bnfold refuses the archive; " + unsafe_hint())


def check_torchscript_code(data: bytes, path: Path) -> ScriptFinding | None:
    """The first use of a file op in a ``code/`` member of a TorchScript archive, or of code that
    does not tokenize (:func:`bnfold.torch.script_code.find_file_op`: TorchScript code runs at
    load, in a module's ``__setstate__``, and in forward; it cannot import Python, but
    ``torch.from_file(name, True, n)`` creates files and ``torch.save`` writes them), or None.
    Read with torch's own zip reader, the one torch.jit.load uses; BadInputError where it cannot
    read the archive."""
    try:
        reader = torch._C.PyTorchFileReader(io.BytesIO(data))
        names = reader.get_all_records()
    except Exception as exc:  # noqa: BLE001 - not a zip torch can read
        raise BadInputError(f"cannot load TorchScript archive '{path}': {one_line(exc, 200)}") from None
    for name in sorted(n for n in names if n.startswith("code/") and n.endswith(".py")):
        found = find_file_op(name, reader.get_record(name))
        if found is not None:
            return found
    return None


class _Drop(logging.Filter):
    """Drops every record, keeping the exceptions they carry (the reasons torch logs, not raises)."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[BaseException] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], BaseException):
            self.errors.append(record.exc_info[1])
        return False


@contextmanager
def quiet_export_loggers() -> Iterator[_Drop]:
    """Drop the records of torch's export loggers (its fallback's log call is broken: formatting
    it prints a ``--- Logging error ---`` traceback to stderr); the exceptions they carried are
    in the yielded filter's ``errors``."""
    drop = _Drop()
    loggers = [logging.getLogger(name) for name in EXPORT_LOGGERS]
    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield drop
    finally:
        for logger in loggers:
            logger.removeFilter(drop)


_FORCE_LOCK = threading.Lock()
_force_users = 0  # threads inside _weights_only_forced
_force_saved: dict[str, str | None] = {}  # the environment before the first of them


@contextmanager
def _weights_only_forced() -> Iterator[None]:
    """Force every ``torch.load`` to weights_only through the environment (process-wide): the
    first of overlapping users (threads) saves the variables, the last one restores them, so
    one thread leaving never lifts the guard under another and nothing stays set afterwards."""
    global _force_users
    with _FORCE_LOCK:
        if _force_users == 0:
            _force_saved.update({k: os.environ.get(k) for k in (_FORCE, _FORCE_NO)})
            os.environ[_FORCE] = "1"
            os.environ.pop(_FORCE_NO, None)  # both set is an error in torch.load
        _force_users += 1
    try:
        yield
    finally:
        with _FORCE_LOCK:
            _force_users -= 1
            if _force_users == 0:
                for key, value in _force_saved.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value
                _force_saved.clear()


def guarded_export_load(data: bytes, *, unsafe: bool = False) -> Any:
    """``torch.export.load`` of the archive bytes ``data``, loggers muted; unless ``unsafe``, with
    every ``torch.load`` inside forced to ``weights_only=True``."""
    with quiet_export_loggers() as dropped:
        try:
            if unsafe:
                return torch.export.load(io.BytesIO(data))
            with _weights_only_forced():
                return torch.export.load(io.BytesIO(data))
        except RuntimeError as exc:
            # torch logs the reason and raises "Please check the warnings above": the log is muted,
            # so the reason goes into the error instead
            if "warnings above" not in str(exc) or not dropped.errors:
                raise
            reason = " ".join(str(dropped.errors[0]).split())
            raise RuntimeError(f"the archive cannot be deserialized: {reason}") from exc
