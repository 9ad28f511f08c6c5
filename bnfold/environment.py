"""What a verification ran on: library versions, platform, onnxruntime providers, GPU.

One place for both uses: :func:`runtime_environment` is what the verify engine records in
``VerifyResult.environment`` (it asks onnxruntime and ``nvidia-smi``); :func:`collect_environment`
is what the reports show (cheap: package metadata, and onnxruntime / torch only when already
imported), with the record's values winning key by key. Library versions come from
``importlib.metadata``: no import of onnx, onnxruntime or torch here.
"""
from __future__ import annotations

import functools
import platform
import shutil
import subprocess
import sys
from collections.abc import Mapping
from importlib import metadata
from typing import Any

from bnfold.json_values import json_safe
from bnfold.version import __version__

__all__ = ["collect_environment", "distribution_version", "report_versions", "runtime_environment"]

#: distributions whose versions a verification run records (those installed)
_RUN_DISTRIBUTIONS = ("bnfold", "onnx", "onnxruntime", "onnxruntime-gpu", "numpy", "torch")


def distribution_version(dist: str) -> str | None:
    """The installed version of distribution ``dist`` (package metadata), or None."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _ort_version() -> str | None:
    # the GPU wheel has another distribution name
    return distribution_version("onnxruntime") or distribution_version("onnxruntime-gpu")


def report_versions() -> dict[str, str | None]:
    """The ``versions`` object of the fold report: onnx, onnxruntime, numpy, python."""
    return {
        "onnx": distribution_version("onnx"),
        "onnxruntime": _ort_version(),
        "numpy": distribution_version("numpy"),
        "python": platform.python_version(),
    }


@functools.lru_cache(maxsize=1)
def _library_versions() -> tuple[tuple[str, str | None], ...]:
    return (
        ("bnfold", __version__),
        ("onnx", distribution_version("onnx")),
        ("onnxruntime", _ort_version()),
        ("numpy", distribution_version("numpy")),
        ("torch", distribution_version("torch")),  # metadata only: torch is never imported here
        ("python", platform.python_version()),
    )


def _providers_available() -> list[str] | None:
    ort = sys.modules.get("onnxruntime")
    if ort is None:
        return None
    try:
        return [str(p) for p in ort.get_available_providers()]
    except Exception:  # pragma: no cover - a broken install
        return None


def _torch_gpu_name() -> str | None:
    torch = sys.modules.get("torch")  # only when the caller already imported it
    if torch is None:
        return None
    try:
        if torch.cuda.is_available():
            return str(torch.cuda.get_device_name(0))
    except Exception:  # pragma: no cover - a broken CUDA setup
        pass
    return None


def _nvidia_smi_gpu() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def runtime_environment() -> dict[str, Any]:
    """What the verify engine records: the installed versions of the libraries that matter, the
    providers onnxruntime offers, and the GPU ``nvidia-smi`` names (None without one)."""
    import onnxruntime as ort

    versions = {}
    for dist in _RUN_DISTRIBUTIONS:
        version = distribution_version(dist)
        if version is not None:
            versions[dist] = version
    return {"versions": versions, "providers_available": ort.get_available_providers(),
            "gpu": _nvidia_smi_gpu()}


def collect_environment(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What the verification ran on: library versions, platform, onnxruntime providers, GPU.

    Cheap: versions come from package metadata; the providers are read only when onnxruntime is
    already imported, the GPU name only when torch is. ``overrides`` (``VerifyResult.environment``)
    win key by key; a ``"versions"`` mapping in it is merged into the collected one.
    """
    env: dict[str, Any] = {
        "versions": dict(_library_versions()),
        "platform": platform.platform(),
        "providers_available": _providers_available(),
        "gpu": _torch_gpu_name(),
    }
    for key, value in (overrides or {}).items():
        if key == "versions" and isinstance(value, Mapping):
            env["versions"] = {**env["versions"], **dict(value)}
        else:
            env[key] = value
    safe: dict[str, Any] = json_safe(env)
    return safe
