"""The files a command reads and writes: existence checks, "never overwrite an input", and the
parent folders made for an output (removed again when the output was not written).

Nothing in this module imports onnx, onnxruntime or torch.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

import bnfold  # its model_files is a lazy name: --help does not import onnx
from bnfold.errors import BadInputError
from bnfold.files import not_a_regular_file, same_file

from .options import ReportConfig

__all__ = ["check_paths", "check_step_summary", "existing_ancestor", "file_record", "make_parents", "not_a_folder",
           "remove_empty", "report_outputs", "require_data", "require_model_file"]


def require_model_file(path: Path) -> None:
    """BadInputError where the MODEL (or REFERENCE, CANDIDATE) path is missing or names something
    other than a regular file (a directory, a device, a FIFO: symbolic links followed), with the
    same words for fold, inspect and verify."""
    kind = not_a_regular_file(path)
    if kind is not None:
        raise BadInputError(f"model path '{path}' is {kind}, not a regular file; pass the model file itself")
    if not path.exists():
        raise BadInputError(f"model file not found: {path}")


def require_data(path: Path) -> None:
    if not path.exists():
        raise BadInputError(f"calibration data not found: {path} (give a .npz, a .npy or a directory of .npy files)")


def check_paths(inputs: Sequence[tuple[Path | None, str]], outputs: Sequence[tuple[Path | None, str]]) -> None:
    """Exit 2 where an output names something other than a regular file or a new path (a device, a
    FIFO, a directory: bnfold's atomic rename would replace it), or would overwrite an input (MODEL,
    --weights, --data, a verified model) or another output: bnfold never overwrites its inputs, and
    each file it writes needs its own path."""
    given_in = [(p, what) for p, what in inputs if p is not None]
    given_out = [(p, hint) for p, hint in outputs if p is not None]
    for i, (path, hint) in enumerate(given_out):
        kind = not_a_regular_file(path)
        if kind is not None:
            raise click.BadParameter(f"{path} is {kind}, not a regular file; bnfold writes only regular files: "
                                     "give the path of a file, or a new path.", param_hint=hint)
        folder = existing_ancestor(path)
        if folder is not None and not folder.is_dir():
            raise BadInputError(not_a_folder(path, folder))
        for src, what in given_in:
            if same_file(src, path):
                raise click.BadParameter(f"is {what}; bnfold never overwrites its input.", param_hint=hint)
            if src.is_dir() and path.exists() and same_file(src, path.parent):  # --data DIR: its files
                raise click.BadParameter(f"is a file in {src}, the folder read as {what}; bnfold never "
                                         "overwrites its input.", param_hint=hint)
        for other, other_hint in given_out[:i]:
            if same_file(other, path):
                raise click.BadParameter(f"is the same file as {other_hint}; give each output its own path.",
                                         param_hint=hint)


def check_step_summary(inputs: Sequence[tuple[Path | str | None, str]] = ()) -> None:
    """BadInputError, before any work, where ``$GITHUB_STEP_SUMMARY`` is set but cannot be appended to
    (a missing folder, a directory or another non-file, a file or folder not writable): the append
    comes after the model and the reports are in place, so failing there would end a run that wrote
    its files with exit 3 and without its verdict. Also where it names one of ``inputs`` (path,
    what) or an external-data file of an ONNX input: appending would change an input."""
    target = os.environ.get("GITHUB_STEP_SUMMARY")
    if not target:
        return
    fix = "point GITHUB_STEP_SUMMARY at a writable file (or unset it)"
    for src, what in inputs:
        if src is None or str(src) == "-" or not Path(target).exists():
            continue
        if Path(src).is_dir():  # --data DIR: the files in it
            if same_file(src, Path(target).parent):
                raise BadInputError(f"$GITHUB_STEP_SUMMARY {target} is in {src}, the folder read as {what}; "
                                    f"bnfold never changes its input: {fix}")
            continue
        # an ONNX model's data files lie under its folder: the model is parsed only for a target there
        inside = Path(target).resolve().is_relative_to(Path(src).resolve().parent)
        for i, f in enumerate(bnfold.model_files(src) if inside else [Path(src)]):
            if same_file(f, target):
                named = what if i == 0 else f"a data file of {what} {src}"
                raise BadInputError(f"$GITHUB_STEP_SUMMARY {target} is {named}; bnfold never changes its input: {fix}")
    kind = not_a_regular_file(target)
    if kind is not None:
        raise BadInputError(f"$GITHUB_STEP_SUMMARY {target} is {kind}, not a regular file; {fix}")
    path = Path(target)
    if path.exists():
        if not os.access(path, os.W_OK):
            raise BadInputError(f"$GITHUB_STEP_SUMMARY {target} is not writable; {fix}")
        return
    folder = path.parent
    if not folder.is_dir():
        raise BadInputError(f"$GITHUB_STEP_SUMMARY {target}: its folder {folder} does not exist; {fix}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BadInputError(f"$GITHUB_STEP_SUMMARY {target}: its folder {folder} is not writable; {fix}")


def not_a_folder(path: Path, folder: Path) -> str:
    """The one line for an output under a regular file (the words the failed write itself used)."""
    return (f"cannot write {path}: {folder} is not a folder bnfold can write in; give the output a path in a "
            "writable folder")


def existing_ancestor(path: Path) -> Path | None:
    """The nearest parent of ``path`` that exists (symbolic links followed), None if none does."""
    for parent in path.parents:
        if parent.exists() or parent.is_symlink():
            return parent
    return None


def report_outputs(report: ReportConfig) -> list[tuple[Path | None, str]]:
    """The report files as (path, option) pairs for :func:`check_paths`."""
    return [(report.path, "'--report'"), (report.junit_xml, "'--junit-xml'"),
            (report.summary_md, "'--summary-md'"), (report.html, "'--html'")]


def make_parents(path: Path) -> list[Path]:
    """``mkdir -p`` the parent of ``path``; return the directories it created, deepest first."""
    created: list[Path] = []
    parent = path.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    for d in reversed(created):
        d.mkdir()
    return created


def remove_empty(dirs: list[Path]) -> None:
    """Remove the folders :func:`make_parents` made (deepest first), as far as they are empty."""
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            break


def file_record(path: Path) -> dict[str, Any]:
    """``{"path", "sha256"}`` of a model file, for the verify report."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return {"path": str(path), "sha256": digest.hexdigest()}
