"""The repro bundle: what a failed verification leaves behind so that the failure can be rerun.

A bundle is one folder::

    repro.json                      the models' absolute paths, providers, tolerances, how the
                                    inputs were made, and a ``bnfold verify`` command that reruns it
    test_data_set_0/input_<k>.pb    the first input batch, one TensorProto per model input, in the
                                    model's input order (the ONNX test-data layout)
    test_data_set_0/output_<k>.pb   the reference's outputs on that batch (first provider that ran)
    inputs.npz                      every batch compared, when no ``bnfold verify`` option recreates
                                    them (``fold``'s inputs); the command feeds it with ``--data``
    reference.onnx, candidate.onnx  ``fold`` only (its models live in a temporary folder): the two
                                    models, with their external-data files under the names they use

Where it goes is the caller's choice (``VerifyConfig.repro_dir``; the CLI passes ``--repro-dir``,
or ``<REPORT>.repro`` beside ``--report``, or ``./bnfold-repro``: see :func:`default_location`).
The bundle is written into a temporary sibling folder and renamed into place, so a folder with the
bundle's name is always a whole bundle. An existing folder at that place is replaced only when it
is empty or exactly a bundle bnfold wrote (its ``repro.json`` carries bnfold's marker and lists every
file and folder there, see :func:`~bnfold.verification.repro_location.is_bundle`); anything else is left
alone and the bundle goes to the first free ``<name>-1``, ``<name>-2``, ... with a warning. The
bundle is a diagnosis: when it cannot be written, a warning says why and the verdict stands
(``VerifyResult.repro_dir`` is then None).

Where the bundle goes is decided by :mod:`bnfold.verification.repro_location` (standard library only:
the CLI decides the folder before it imports onnx).
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from bnfold.onnx.io import external_locations
from bnfold.verification.config import VerifyConfig
from bnfold.verification.repro_location import (
    BUNDLE_FILE,
    DEFAULT_DIR,
    choose,
    default_location,
    is_bundle,
    marker,
    replaceable,
    swap_into_place,
)
from bnfold.verification.tolerances import format_tolerances

__all__ = ["BUNDLE_FILE", "DEFAULT_DIR", "default_location", "is_bundle", "replaceable", "write_bundle",
           "repro_command"]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- what


def _recreated_by_options(inputs: Mapping[str, Any]) -> bool:
    """Whether ``bnfold verify``'s own options recreate the feeds (its --data file, or its seeded
    uniform inputs); ``fold``'s feeds (first calibration samples, standard-normal) are not."""
    if inputs.get("source") == "data":
        return bool(inputs.get("path"))
    return inputs.get("source") == "random" and inputs.get("val_range") is not None


def repro_command(reference: str, candidate: str, config: VerifyConfig, *, data: str | None = None,
                  batch_size: int | None = None) -> str:
    """The ``bnfold verify`` command line that reruns the comparison (a shell-quoted string).

    ``data``: a file holding the very feeds (``inputs.npz``), fed in batches of ``batch_size``;
    otherwise the inputs are described by ``config.inputs`` (``--data PATH`` or ``--seed`` and
    ``--val-range``). Tolerances, the error statistic and the provider flags are repeated.
    """
    inp = config.inputs
    args = ["bnfold", "verify", os.path.abspath(reference), os.path.abspath(candidate)]
    if data is not None:
        args += ["--data", data]
        if batch_size:
            args += ["--batch-size", str(batch_size)]
    elif inp.get("source") == "data" and inp.get("path"):
        args += ["--data", str(inp["path"])]
        if inp.get("batch_size"):
            args += ["--batch-size", str(inp["batch_size"])]
        if inp.get("iterations"):
            args += ["--iterations", str(inp["iterations"])]
    else:
        if inp.get("seed") is not None:
            args += ["--seed", str(inp["seed"])]
        if inp.get("val_range"):
            args.append("--val-range=" + ",".join(repr(float(v)) for v in inp["val_range"]))
        if inp.get("batch_size"):
            args += ["--batch-size", str(inp["batch_size"])]
        if inp.get("iterations"):
            args += ["--iterations", str(inp["iterations"])]
    args += ["--providers", ",".join(config.providers)]
    for flag, tol in (("--atol", config.atol), ("--rtol", config.rtol)):
        spec = format_tolerances(tol)
        if spec is not None:
            args.append(f"{flag}={spec}")
    if config.error_stat != "max":
        args += ["--check-error-stat", config.error_stat]
        if config.error_stat == "quantile":
            args += ["--quantile", repr(float(config.quantile))]
    if config.allow_missing_providers:
        args.append("--allow-missing-providers")
    if config.tf32:
        args.append("--tf32")
    if not config.noise_floor:
        args.append("--no-noise-floor")
    return shlex.join(args)


def _model_inputs(path: str) -> list[str]:
    try:
        graph = onnx.load(path, load_external_data=False).graph
    except Exception:  # the order is a nicety; the names come from the feed anyway
        return []
    inits = {t.name for t in graph.initializer}
    return [v.name for v in graph.input if v.name not in inits]


def _external_locations(path: str) -> list[str]:
    """The external-data files ``path``'s tensors point at (relative to its folder)."""
    return list(external_locations(onnx.load(path, load_external_data=False)))


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the file system allows it (no copy of gigabytes of weights), else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _copy_model(path: str, folder: Path, name: str) -> Path:
    target = folder / name
    _link_or_copy(Path(path), target)
    base = Path(path).parent
    for location in _external_locations(path):  # keep their names: the model refers to them
        rel = Path(location)
        if rel.is_absolute() or ".." in rel.parts:
            raise OSError(f"{path} names external data outside its folder ({location}); not copied")
        _link_or_copy(base / rel, folder / rel)
    return target


def _fill(tmp: Path, final: Path, reference: str, candidate: str, feeds: Sequence[Mapping[str, np.ndarray]],
          config: VerifyConfig, reference_outputs: Mapping[str, np.ndarray] | None) -> None:
    data = tmp / "test_data_set_0"
    data.mkdir()
    first = feeds[0]
    order = [n for n in _model_inputs(reference) if n in first]
    order += [n for n in first if n not in order]
    for k, name in enumerate(order):
        tensor = numpy_helper.from_array(np.ascontiguousarray(first[name]), name)
        (data / f"input_{k}.pb").write_bytes(tensor.SerializeToString())
    for k, (name, value) in enumerate((reference_outputs or {}).items()):
        tensor = numpy_helper.from_array(np.ascontiguousarray(value), name)
        (data / f"output_{k}.pb").write_bytes(tensor.SerializeToString())

    ref, cand = os.path.abspath(reference), os.path.abspath(candidate)
    if config.repro_copy_models:
        _copy_model(reference, tmp, "reference.onnx")
        _copy_model(candidate, tmp, "candidate.onnx")
        ref, cand = os.path.abspath(final / "reference.onnx"), os.path.abspath(final / "candidate.onnx")

    npz = None
    batch = None
    if not _recreated_by_options(config.inputs):
        try:
            arrays = {name: np.concatenate([np.asarray(f[name]) for f in feeds]) for name in order}
        except (KeyError, ValueError):  # batches of different shapes: test_data_set_0 only
            arrays = None
        if arrays is not None:
            # numpy's stub lets a **kwds key land on its allow_pickle: bool parameter
            np.savez(tmp / "inputs.npz", **arrays)  # type: ignore[arg-type]  # uncompressed: memory-mapped
            npz = os.path.abspath(final / "inputs.npz")
            lead = np.asarray(first[order[0]]) if order else None
            batch = int(lead.shape[0]) if lead is not None and lead.ndim else None
    doc = {
        **marker(tmp),  # bnfold's mark and the bundle's files: what a later run may replace
        "reference": ref,
        "candidate": cand,
        "providers": list(config.providers),
        "tolerances": {
            "atol": {"global": config.atol[0], "per_output": dict(config.atol[1])},
            "rtol": {"global": config.rtol[0], "per_output": dict(config.rtol[1])},
            "error_stat": config.error_stat,
            "quantile": config.quantile if config.error_stat == "quantile" else None,
        },
        "inputs": dict(config.inputs),
        "batches": len(feeds),
        "test_data": "test_data_set_0",
        "inputs_npz": "inputs.npz" if npz else None,
        "command": repro_command(ref, cand, config, data=npz, batch_size=batch),
    }
    (tmp / BUNDLE_FILE).write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")


def write_bundle(directory: str | os.PathLike[str], reference: str, candidate: str,
                 feeds: Sequence[Mapping[str, np.ndarray]], config: VerifyConfig,
                 reference_outputs: Mapping[str, np.ndarray] | None = None) -> str | None:
    """Write the bundle for a failed comparison at ``directory`` (or the first free ``<name>-N``
    beside it, see the module docstring); return the folder written, or None (with a warning)
    when it could not be written. Never raises: the bundle must not hide the verdict."""
    requested = Path(directory)
    try:
        target = choose(requested)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            _fill(tmp, target, reference, candidate, feeds, config, reference_outputs)
            swap_into_place(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except Exception as exc:  # noqa: BLE001 - a diagnosis; the verdict is what matters
        reason = f"{exc.strerror}: {exc.filename}" if isinstance(exc, OSError) and exc.strerror else str(exc)
        log.warning("could not write the repro bundle to %s (%s)", requested, reason or type(exc).__name__)
        return None
    if target != requested:
        log.warning("%s exists and is not a bnfold repro bundle: wrote the repro bundle to %s instead",
                    requested, target)
    return str(target)
