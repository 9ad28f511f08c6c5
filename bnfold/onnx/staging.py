"""Where ``fold`` writes its models: a staging folder beside OUTPUT, moved into place on a verdict.

``fold`` writes the frozen reference and the folded candidate into a private folder next to the
output (so the final rename stays on one file system), verifies them there, and only a model
that passed (or was not verified) is moved to OUTPUT. The folder and everything in it are
removed when the staging ends, also on error; nothing outside it is touched but OUTPUT, its own
data files, and ``--frozen-output``.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType

import onnx

from bnfold.onnx.io import (
    LoadedModel,
    data_files,
    file_stamp,
    ir_version_for_save,
    remove_stale_data,
    save_onnx,
    stamp_bytes,
)


class Staging:
    """The staging folder of one ``fold`` run (a context manager; ``folder`` is None when the run
    writes nothing that needs staging: no output and no verification)."""

    def __init__(self, loaded: LoadedModel, output: str | os.PathLike[str] | None,
                 frozen_output: str | os.PathLike[str] | None, *, verify: bool) -> None:
        self.loaded = loaded
        self.output = Path(output) if output else None
        self.frozen_output = Path(frozen_output) if frozen_output else None
        self.verify = verify
        self.size_hint = stamp_bytes(loaded.stamp)  # the input's size: about the output's
        self.folder: Path | None = None

    def __enter__(self) -> Staging:
        if self.output is not None:
            self.output.parent.mkdir(parents=True, exist_ok=True)
        if self.frozen_output is not None:
            self.frozen_output.parent.mkdir(parents=True, exist_ok=True)
        if self.verify or self.output is not None:
            parent = self.output.parent if self.output is not None else None
            self.folder = Path(tempfile.mkdtemp(prefix=".bnfold-", dir=parent))
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _save(self, model: onnx.ModelProto, path: Path) -> str:
        return save_onnx(model, path, external_data=self.loaded.external_data, size_hint=self.size_hint)

    def write_reference(self, model: onnx.ModelProto, input_is_reference: bool) -> Path | None:
        """Write ``--frozen-output`` and return the verification reference (None without
        verification): the input file itself where ``input_is_reference`` and it is unchanged since
        it was read, else the frozen output just written, else a frozen copy in the folder.
        ``model`` (the frozen, unfolded model) must already be prepared for saving."""
        reference = self.loaded.path if input_is_reference else None
        if self.frozen_output is not None:
            self._save(model, self.frozen_output)
        if reference is not None and file_stamp(reference, self.loaded.locations) != self.loaded.stamp:
            reference = None  # the input changed since it was read
        if not self.verify:
            return None
        if reference is None and self.frozen_output is not None and not _same_file(self.frozen_output, self.output):
            reference = self.frozen_output  # just written: the frozen model, no second copy
        if reference is None:
            assert self.folder is not None
            reference = self.folder / "frozen.onnx"
            self._save(model, reference)
        return reference

    def write_candidate(self, model: onnx.ModelProto) -> tuple[Path, str]:
        """Write the folded model into the folder; its path and sha256."""
        assert self.folder is not None
        staged = self.folder / (self.output.name if self.output is not None else "folded.onnx")
        return staged, self._save(model, staged)

    def publish(self, staged: Path) -> Path:
        """Move the staged model (and its data file) to OUTPUT; stale data files of OUTPUT go last.

        Data file first (under its fresh name), then the model. A model read without external data
        has one too where it was too large for one protobuf.
        """
        output = self.output
        assert output is not None and staged.name == output.name  # the model names its data file after itself
        keep = ""
        for data in data_files(staged):
            os.replace(data, output.parent / data.name)
            keep = data.name
        try:
            os.replace(staged, output)
        except OSError:
            if keep:  # leave the directory as it was: the old model and its data
                (output.parent / keep).unlink(missing_ok=True)
            raise
        if self.loaded.external_data or keep:
            remove_stale_data(output, keep=keep)
        return output


def _same_file(a: Path, b: Path | None) -> bool:
    return b is not None and a.resolve() == b.resolve()


def input_is_reference(loaded: LoadedModel, model: onnx.ModelProto, renamed: bool) -> bool:
    """Whether the input file is the frozen model as ``fold`` would write it.

    Called before anything is frozen or folded (the caller checks that nothing was calibrated),
    while the model in memory is still the input as read. Writing that model again (all its
    weights, gigabytes for some models) would give the same graph and the same tensors with
    only the producer fields changed, so the input file is used as the verification reference
    when: it was read from a file; its IR version is the one ``prepare_for_save`` writes (else
    onnxruntime may refuse it, or the written model would differ); no node was renamed
    (``name_nodes``: fold-site results carry the reference's BN node names, which must be the
    report's); every external-data file lies inside the model's folder as a relative path (as
    onnxruntime requires); and ``Staging.write_reference`` checks just before using it that the
    files were not changed since they were read (``file_stamp``). In any doubt the frozen model is
    written.
    """
    path = loaded.path
    if path is None or not loaded.stamp or renamed:
        return False
    if ir_version_for_save(model) != model.ir_version:
        return False
    try:
        folder = path.resolve().parent
        if path.parent.resolve() != folder:  # a link to a model in another folder
            return False
        for location in loaded.locations:
            rel = Path(location)
            if rel.is_absolute() or ".." in rel.parts:
                return False
            if not (path.parent / rel).resolve().is_relative_to(folder):
                return False
    except (OSError, RuntimeError, ValueError):
        return False
    return True
