"""The machine-readable report: ``report_to_dict`` and ``write_json``.

The layout is fixed by ``docs/report-schema.json`` (``SCHEMA_VERSION``); change both together and
bump the version. The report computes nothing new: it renders the :class:`Report` record.

JSON has no infinities or NaN; non-finite floats (an output whose shape or NaN positions differ
reports ``max_abs`` = inf) are written as the strings ``"inf"``, ``"-inf"`` and ``"nan"``, and the
file is written with ``allow_nan=False`` so it is strict JSON any parser accepts.

Only the standard library and numpy are imported; versions come from ``importlib.metadata``
(cheap: no import of onnx or onnxruntime).
"""
from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import platform
import tempfile
from importlib import metadata
from pathlib import PurePath
from typing import Any

import numpy as np

from ..records import BnRecord, FrozenStats, OutputError, Report, VerifyResult

__all__ = ["SCHEMA_VERSION", "report_to_dict", "to_json", "write_json"]

SCHEMA_VERSION = "1.0"
TOOL_NAME = "bnfold"


def _number(value: Any) -> float | str:
    """A JSON-safe float: non-finite values become ``"inf"``, ``"-inf"`` or ``"nan"``."""
    x = float(value)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def _json_safe(value: Any) -> Any:
    """Recursively convert enums, numpy values, paths, dataclasses and tuples to JSON types."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, enum.Enum):
        return _json_safe(value.value)
    if isinstance(value, (int, np.integer)) and not isinstance(value, np.bool_):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (float, np.floating)):
        return _number(value)
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    if isinstance(value, PurePath):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _json_safe(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(_json_safe(k)): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [_json_safe(v) for v in items]
    return str(value)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _tool_version() -> str:
    try:
        from .. import __version__

        return __version__
    except ImportError:  # pragma: no cover
        return _version("bnfold") or "unknown"


def _versions() -> dict[str, str | None]:
    ort = _version("onnxruntime")
    if ort is None:  # the GPU wheel has another distribution name
        ort = _version("onnxruntime-gpu")
    return {
        "onnx": _version("onnx"),
        "onnxruntime": ort,
        "numpy": _version("numpy"),
        "python": platform.python_version(),
    }


def _min_max(array: np.ndarray) -> tuple[float | str | None, float | str | None]:
    arr = np.asarray(array, dtype=np.float64)
    if arr.size == 0:
        return None, None
    return _number(arr.min()), _number(arr.max())


def _stats_to_dict(stats: FrozenStats | None) -> dict[str, Any] | None:
    if stats is None:
        return None
    out: dict[str, Any] = {
        "samples": int(stats.samples),
        "batches": int(stats.batches),
        "estimator_gap": _number(stats.gap),
    }
    for key, arr in (
        ("mean", stats.mean),
        ("var", stats.var),
        ("var_unbiased", stats.var_unbiased),
        ("var_pooled", stats.var_pooled),
    ):
        lo, hi = _min_max(arr)
        out[f"{key}_min"] = lo
        out[f"{key}_max"] = hi
    return out


def _bn_to_dict(bn: BnRecord) -> dict[str, Any]:
    return {
        "name": bn.name,
        "mode_before": _json_safe(bn.mode_before),
        "action": _json_safe(bn.action),
        "target": bn.target,
        "direction": bn.direction,
        "reason": _json_safe(bn.reason),
        "detail": bn.detail,
        "channels": None if bn.channels is None else int(bn.channels),
        "stats": _stats_to_dict(bn.stats),
    }


def _output_to_dict(out: OutputError) -> dict[str, Any]:
    return {
        "name": out.name,
        "dtype": out.dtype,
        "max_abs": _number(out.max_abs),
        "max_rel": _number(out.max_rel),
        "atol": _number(out.atol),
        "rtol": _number(out.rtol),
        "passed": bool(out.passed),
    }


def _verification_to_dict(result: VerifyResult | None) -> dict[str, Any] | None:
    if result is None:
        return None
    return {
        "passed": bool(result.passed),
        "provider": result.provider,
        "samples": int(result.samples),
        "rule": result.rule,
        "note": result.note,
        "outputs": [_output_to_dict(o) for o in result.outputs],
        "max_abs": _number(result.max_abs),
        "max_rel": _number(result.max_rel),
    }


def report_to_dict(report: Report) -> dict[str, Any]:
    """The report as plain JSON types, in the layout of ``docs/report-schema.json``."""
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": TOOL_NAME, "version": _tool_version()},
        "versions": _versions(),
        "input": {"path": _json_safe(report.input_path), "sha256": report.input_sha256},
        "output": {"path": _json_safe(report.output_path), "sha256": report.output_sha256},
        "estimator": report.estimator,
        "batch_size": None if report.batch_size is None else int(report.batch_size),
        "calibrated": bool(report.calibrated),
        "dry_run": bool(report.dry_run),
        "counts": {
            "bn": len(report.bns),
            "folded": report.folded,
            "frozen_kept": report.kept,
        },
        "bns": [_bn_to_dict(b) for b in report.bns],
        "warnings": [str(w) for w in report.warnings],
        "verification": _verification_to_dict(report.verification),
        "extra": _json_safe(dict(report.extra)),
    }


def to_json(report: Report) -> str:
    """The report as strict JSON text (indented, trailing newline)."""
    return json.dumps(report_to_dict(report), indent=2, allow_nan=False, ensure_ascii=False) + "\n"


def _new_file_mode() -> int:
    # What open() would give a new file: 0o666 minus the umask (read back by setting it twice).
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def write_json(report: Report, path: str | os.PathLike) -> None:
    """Write the report to ``path`` atomically: a temporary file in the same directory, then
    ``os.replace``. A reader never sees a half-written report; on failure nothing is left behind."""
    text = to_json(report)
    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target))
    try:
        mode = os.stat(target).st_mode & 0o777
    except FileNotFoundError:
        mode = _new_file_mode()
    fd, tmp = tempfile.mkstemp(
        prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=directory
    )
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
