"""The machine-readable report: ``report_to_dict`` / ``write_json`` (after ``fold``) and
``verify_report_to_dict`` / ``write_verify_json`` (a standalone verification).

Both kinds share one layout, fixed by ``docs/report-schema.json`` (``SCHEMA_VERSION``) and described
field by field in ``docs/report-schema.md``; change them together and bump the version. A top-level
``"kind"`` (``"fold"`` or ``"verify"``) says which of the two a document is. The report computes
nothing new: it renders the :class:`Report` / :class:`VerifyResult` records.

JSON has no infinities or NaN; non-finite floats (an output whose shape or NaN positions differ
reports ``max_abs`` = inf) are written as the strings ``"inf"``, ``"-inf"`` and ``"nan"``, and the
file is written with ``allow_nan=False`` so it is strict JSON any parser accepts.

Only the standard library and numpy are imported; versions come from ``importlib.metadata``
(cheap: no import of onnx, onnxruntime or torch). The list of available onnxruntime providers is
read only when onnxruntime has already been imported (it has, whenever a verification ran).
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from bnfold.environment import report_versions
from bnfold.json_values import json_number as _number
from bnfold.json_values import json_safe as _json_safe
from bnfold.records import Drift, FrozenStats, Sufficiency
from bnfold.report.facts import verify_facts
from bnfold.run_records import BnRecord, OutputMetrics, ProviderRun, Report, SiteResult, VerifyResult
from bnfold.version import __version__

__all__ = [
    "SCHEMA_VERSION",
    "drift_to_dict",
    "report_to_dict",
    "to_json",
    "write_json",
    "verification_to_dict",
    "verify_report_to_dict",
    "verify_to_json",
    "write_verify_json",
    "write_text_atomic",
]

SCHEMA_VERSION = "2.2"
TOOL_NAME = "bnfold"

# ---- fold records -------------------------------------------------------------------------------
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
    out["sufficiency"] = sufficiency_to_dict(stats.sufficiency)
    return out


def sufficiency_to_dict(s: Sufficiency | None) -> dict[str, Any] | None:
    """A BN's ``stats.sufficiency`` (docs/report-schema.md, "sufficiency"): figures null and
    ``reason`` set where they cannot be estimated (fewer than two batches)."""
    if s is None:
        return None
    return {
        "batches": int(s.batches),
        "samples": int(s.samples),
        "target": _number(s.target),
        "mean_se_sigma_max": None if s.mean_se_sigma_max is None else _number(s.mean_se_sigma_max),
        "var_rse_max": None if s.var_rse_max is None else _number(s.var_rse_max),
        "worst_channel": None if s.worst_channel is None else int(s.worst_channel),
        "samples_for_target": None if s.samples_for_target is None else int(s.samples_for_target),
        "met": s.met,
        "reason": s.reason,
    }


def drift_to_dict(drift: Drift | None) -> dict[str, Any] | None:
    """A BN's ``drift`` record (docs/report-schema.md, "drift"); also ``bnfold inspect --json``'s."""
    if drift is None:
        return None
    return {
        "mean_shift_sigma_max": None if drift.mean_shift_sigma_max is None else _number(drift.mean_shift_sigma_max),
        "log_var_ratio_max": None if drift.log_var_ratio_max is None else _number(drift.log_var_ratio_max),
        "worst_channel": None if drift.worst_channel is None else int(drift.worst_channel),
        "note": drift.note,
    }


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
        "drift": drift_to_dict(bn.drift),
    }


# ---- verification records -----------------------------------------------------------------------
def _metrics_to_dict(metrics: OutputMetrics) -> dict[str, Any]:
    # OutputMetrics.to_dict() is JSON-safe for Python floats; a second pass covers numpy scalars
    return _json_safe(metrics.to_dict())


def _run_to_dict(run: ProviderRun) -> dict[str, Any]:
    return {
        "provider": run.provider,
        "status": run.status,
        "used": [str(p) for p in run.used],
        "passed": bool(run.passed),
        "note": run.note,
        "noise_floor": {str(name): _number(v) for name, v in run.noise_floor},
        "outputs": [_metrics_to_dict(o) for o in run.outputs],
    }


def _site_to_dict(site: SiteResult) -> dict[str, Any]:
    return {
        "bn": site.bn,
        "tensor": site.tensor,
        "target": site.target,
        "direction": site.direction,
        "position": int(site.position),
        "max_abs": _number(site.max_abs),
        "max_rel": _number(site.max_rel),
        "atol": _number(site.atol),
        "rtol": _number(site.rtol),
        "passed": bool(site.passed),
        "worst_channels": [
            {"channel": int(c), "max_abs": _number(v)} for c, v in site.worst_channels
        ],
        "floor_max": None if site.floor_max is None else _number(site.floor_max),
    }


def verification_to_dict(result: VerifyResult | None) -> dict[str, Any] | None:
    """The ``verification`` object of both report kinds (``None`` stays ``None``)."""
    if result is None:
        return None
    facts = verify_facts(result)
    return {
        "verdict": "pass" if result.passed else "fail",
        "passed": bool(result.passed),
        "samples": int(result.samples),
        "rule": result.rule,
        "note": result.note,
        "max_abs": _number(result.max_abs),
        "max_rel": _number(result.max_rel),
        "settings": facts.settings,
        "inputs": facts.inputs,
        "environment": facts.environment(),
        "runs": [_run_to_dict(r) for r in result.runs],
        "sites": [_site_to_dict(s) for s in result.sites],
        "first_divergent_site": result.first_divergent_site,
        "repro_dir": _json_safe(result.repro_dir),
    }


def _tool() -> dict[str, str]:
    return {"name": TOOL_NAME, "version": __version__}


def report_to_dict(report: Report) -> dict[str, Any]:
    """The fold report as plain JSON types (``kind: "fold"``), see ``docs/report-schema.json``."""
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "fold",
        "tool": _tool(),
        "versions": report_versions(),
        "input": {"path": _json_safe(report.input_path), "sha256": report.input_sha256},
        "output": {"path": _json_safe(report.output_path), "sha256": report.output_sha256},
        "estimator": report.estimator,
        "batch_size": None if report.batch_size is None else int(report.batch_size),
        "calibrated": bool(report.calibrated),
        "recalibrate": report.recalibrate,
        "dry_run": bool(report.dry_run),
        "counts": {
            "bn": len(report.bns),
            "folded": report.folded,
            "frozen_kept": report.kept,
        },
        "bns": [_bn_to_dict(b) for b in report.bns],
        "warnings": [str(w) for w in report.warnings],
        "verification": verification_to_dict(report.verification),
        "calibration": calibration_to_dict(report),
        "extra": _json_safe({k: v for k, v in report.extra.items() if k != "calibration"}),
    }


def calibration_to_dict(report: Report) -> dict[str, Any]:
    """``calibration``: the processes that calibrated (``world_size``, 1 for one process) and, with
    data, the samples and batches over all of them (``report.extra["calibration"]``)."""
    given = dict(report.extra.get("calibration") or {})
    out: dict[str, Any] = {"world_size": int(given.get("world_size", 1))}
    for key in ("samples", "batches"):
        if given.get(key) is not None:
            out[key] = int(given[key])
    return out


def _file(spec: Mapping[str, Any] | None, what: str) -> dict[str, Any]:
    spec = dict(spec or {})
    unknown = set(spec) - {"path", "sha256"}
    if unknown:
        raise ValueError(f"{what}: unexpected key(s) {', '.join(sorted(unknown))}; use path, sha256")
    return {"path": _json_safe(spec.get("path")), "sha256": spec.get("sha256")}


def verify_report_to_dict(
    result: VerifyResult, *, reference: Mapping[str, Any], candidate: Mapping[str, Any]
) -> dict[str, Any]:
    """A standalone verification (``kind: "verify"``): the two models compared and the verdict.

    ``reference`` / ``candidate`` are ``{"path": ..., "sha256": ...}`` (either value may be None).
    """
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "verify",
        "tool": _tool(),
        "reference": _file(reference, "reference"),
        "candidate": _file(candidate, "candidate"),
        "verification": verification_to_dict(result),
    }


def _dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, allow_nan=False, ensure_ascii=False) + "\n"


def to_json(report: Report) -> str:
    """The fold report as strict JSON text (indented, trailing newline)."""
    return _dumps(report_to_dict(report))


def verify_to_json(
    result: VerifyResult, *, reference: Mapping[str, Any], candidate: Mapping[str, Any]
) -> str:
    """The verify report as strict JSON text (indented, trailing newline)."""
    return _dumps(verify_report_to_dict(result, reference=reference, candidate=candidate))


# ---- atomic writes ------------------------------------------------------------------------------
def _new_file_mode() -> int:
    # What open() would give a new file: 0o666 minus the umask (read back by setting it twice).
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def write_text_atomic(text: str, path: str | os.PathLike) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically: a temporary file in the same directory, then
    ``os.replace``. A reader never sees a half-written file; on failure nothing is left behind.
    An existing file keeps its permissions."""
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


def write_json(report: Report, path: str | os.PathLike) -> None:
    """Write the fold report to ``path`` atomically (see :func:`write_text_atomic`)."""
    write_text_atomic(to_json(report), path)


def write_verify_json(
    result: VerifyResult,
    path: str | os.PathLike,
    *,
    reference: Mapping[str, Any],
    candidate: Mapping[str, Any],
) -> None:
    """Write the verify report to ``path`` atomically (see :func:`write_text_atomic`)."""
    write_text_atomic(verify_to_json(result, reference=reference, candidate=candidate), path)
