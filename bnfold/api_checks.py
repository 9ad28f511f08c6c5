"""Type checks of the Python API's arguments (``bnfold.fold``, ``inspect``, ``verify``).

A pipeline that passes a wrong type (a dict for a model, ``batch_size=1.5``, a dict for a
``VerifyConfig``) gets one ``BadInputError`` naming the argument and what to pass, before any
work, instead of a ``TypeError`` or ``AttributeError`` from deep inside the pipeline.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

import bnfold  # for bnfold.VerifyConfig, a lazy name: bnfold.torch and bnfold.data call these checks too
from bnfold.errors import BadInputError


def _kind(value: Any) -> str:
    return type(value).__name__


def check_model(value: Any, name: str = "model", *, proto: bool = True) -> None:
    """``value`` is a path (``str`` or ``os.PathLike``), or with ``proto`` an ``onnx.ModelProto``."""
    if isinstance(value, str) or (isinstance(value, os.PathLike) and isinstance(os.fspath(value), str)):
        return
    if proto:
        import onnx  # here: ``import bnfold.torch`` checks its arguments without loading onnx

        if isinstance(value, onnx.ModelProto):
            return
    what = "a path (str or os.PathLike) or an onnx.ModelProto" if proto else "a path (str or os.PathLike)"
    raise BadInputError(f"{name} must be {what}, got {_kind(value)}; pass the .onnx file's path"
                        + ("" if proto else " (save an in-memory model with onnx.save first)"))


def check_path(value: Any, name: str) -> None:
    """An output path: None, a ``str`` or an ``os.PathLike`` of ``str``."""
    if value is None or isinstance(value, str) or (isinstance(value, os.PathLike)
                                                  and isinstance(os.fspath(value), str)):
        return
    raise BadInputError(f"{name} must be a path (str or os.PathLike), got {_kind(value)}; pass e.g. {name}='out.onnx'")


def check_count(value: Any, name: str, *, optional: bool = False, label: str | None = None) -> None:
    """A whole number >= 1 (``None`` too where ``optional``); bools are not counts. ``label``: how
    the message names it (default ``name``)."""
    if value is None and optional:
        return
    label = label or name
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise BadInputError(f"{label} must be a whole number, got {value!r}; use {name}=N with N >= 1")
    if value < 1:
        raise BadInputError(f"{label} must be at least 1, got {value}; use {name}=N with N >= 1")


def check_callable(value: Any, name: str) -> None:
    if value is not None and not callable(value):
        raise BadInputError(f"{name} must be a callable progress(done, total) or None, got {_kind(value)}")


def check_data(value: Any) -> None:
    """Calibration data: a path, a mapping of input name -> array, or an iterable of batches."""
    if value is None or isinstance(value, (str, os.PathLike, Mapping)):
        return
    if isinstance(value, (bytes, bytearray, memoryview)) or not isinstance(value, Iterable) or isinstance(value, bool):
        raise BadInputError(f"data must be a .npz/.npy path or folder, a mapping of input name -> array, or an "
                            f"iterable of batches, got {_kind(value)}")


def check_config(value: Any, name: str) -> None:
    """A ``VerifyConfig`` (or None) whose tolerances and providers have the documented shapes."""
    if value is None:
        return
    if not isinstance(value, bnfold.VerifyConfig):
        raise BadInputError(f"{name} must be a bnfold.VerifyConfig, got {_kind(value)}; "
                            f"pass {name}=bnfold.VerifyConfig(...)")
    if isinstance(value.providers, str) or not isinstance(value.providers, (tuple, list)):
        raise BadInputError(f"VerifyConfig.providers must be a tuple of provider names, got {value.providers!r}; "
                            "pass e.g. providers=('cpu',)")
    for field_name in ("atol", "rtol"):
        tol = getattr(value, field_name)
        if not (isinstance(tol, tuple) and len(tol) == 2 and isinstance(tol[1], Mapping)):
            raise BadInputError(f"VerifyConfig.{field_name} must be (global value or None, {{output name: value}}), "
                                f"got {tol!r}; pass e.g. {field_name}=(1e-4, {{}})")

def check_seed(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise BadInputError(f"seed must be a whole number >= 0, got {value!r}; pass e.g. seed=0")


def check_val_range(value: Any) -> None:
    ok = (isinstance(value, (tuple, list)) and len(value) == 2
          and all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
                  and math.isfinite(v) for v in value))
    if not ok:
        raise BadInputError(f"val_range must be two finite numbers (LO, HI), got {value!r}; "
                            "pass e.g. val_range=(0.0, 1.0)")
    if value[0] > value[1]:
        raise BadInputError(f"val_range LO must not exceed HI, got {tuple(value)!r}; pass e.g. val_range=(0.0, 1.0)")
