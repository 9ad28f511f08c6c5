"""Which model inputs calibration data supplies, read from its names before it is opened.

A model may have inputs that are not samples: a second input of static shape (``s[4,1,1]``), BN
parameters or weights given as inputs. Data that supplies only the sample inputs is opened for
those; the others get generated values where only their shape matters (verification), and the
calibration network says when it needs one the data lacks (``bnfold/stages/calibrate.py``).
"""
from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from typing import Any

from bnfold.records import InputSpec

__all__ = ["supplied_specs"]


def supplied_specs(data: Any, specs: list[InputSpec]) -> list[InputSpec]:
    """The ``specs`` that ``data`` (a mapping, a ``CalibrationData``, or a ``.npz``/``.npy``
    path or folder) has an array for. Every spec when that cannot be told, when none would be left,
    or when the data holds a name that is no model input, so that opening the data names what is
    missing or wrong against all the model's inputs."""
    names = _names(data, specs)
    if names is not None and names - {s.name for s in specs}:
        return list(specs)  # a name that is no model input (a typo?): the error lists every input the model has
    chosen = [s for s in specs if s.name in names] if names is not None else []
    return chosen or list(specs)


def _names(data: Any, specs: list[InputSpec]) -> set[str] | None:
    if hasattr(data, "supplied_names"):  # a stream (bnfold.data.stream.StreamSource): its first batch's keys
        names = data.supplied_names
        return set(names) if names is not None else None
    inputs = getattr(data, "inputs", None)
    if inputs is not None:  # opened data: what it was opened for
        return {s.name for s in inputs}
    if isinstance(data, Mapping):
        return {str(k) for k in data}
    try:
        path = os.fspath(data)
    except TypeError:
        return None
    if os.path.isdir(path):
        try:
            files = [os.path.join(path, n) for n in sorted(os.listdir(path)) if not n.startswith(".")]
        except OSError:
            return None
        found: set[str] = set()
        for f in files:
            got = _file_names(f, specs) if os.path.isfile(f) else set()
            if got is None:
                return None
            found |= got
        return found
    return _file_names(path, specs)


def _file_names(path: str, specs: list[InputSpec]) -> set[str] | None:
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":  # one array: the one input whose first dim is the (symbolic) batch
        batched = [s.name for s in specs if s.shape and s.shape[0] is None]
        return set(batched) if len(batched) == 1 else None
    if ext != ".npz":
        return set()
    try:
        with zipfile.ZipFile(path) as zf:
            return {n[:-4] if n.endswith(".npy") else n for n in zf.namelist()}
    except (OSError, zipfile.BadZipFile, ValueError):
        return None
