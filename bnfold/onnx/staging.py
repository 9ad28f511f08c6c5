"""Where ``fold`` writes its models: staged in :class:`bnfold.outputs.Outputs`, moved into place together.

``fold`` writes the frozen reference and the folded candidate into the private staging folder
beside the output (so the final rename stays on one file system), verifies them there, and
registers only a model that passed (or was not verified) for OUTPUT; ``--frozen-output`` is
registered as soon as it is written. Nothing reaches OUTPUT or FROZEN before the caller's
``Outputs.commit()``, which moves them with their data files (and the caller's reports) at once;
a run that ends in an error leaves none of them.
"""
from __future__ import annotations

import os
from pathlib import Path

import onnx

from bnfold.onnx.io import (
    LoadedModel,
    Written,
    file_stamp,
    ir_version_for_save,
    publish_model,
    stage_model,
    stamp_bytes,
    write_onnx,
)
from bnfold.outputs import Outputs


class Staging:
    """The models of one ``fold`` run, written into ``outputs``."""

    def __init__(self, loaded: LoadedModel, output: str | os.PathLike[str] | None,
                 frozen_output: str | os.PathLike[str] | None, *, verify: bool, outputs: Outputs) -> None:
        self.loaded = loaded
        self.output = Path(output) if output else None
        self.frozen_output = Path(frozen_output) if frozen_output else None
        self.verify = verify
        self.outputs = outputs
        self.size_hint = stamp_bytes(loaded.stamp)  # the input's size: about the output's
        self._scratch_folder: Path | None = None

    def _stage(self, model: onnx.ModelProto, target: Path) -> Written:
        return stage_model(self.outputs, model, target, external_data=self.loaded.external_data,
                           size_hint=self.size_hint)

    def _scratch(self, model: onnx.ModelProto, name: str) -> Path:
        folder = self._scratch_folder = self._scratch_folder or self.outputs.scratch(self.output)
        return write_onnx(model, folder / name, external_data=self.loaded.external_data,
                          size_hint=self.size_hint).path

    def write_reference(self, model: onnx.ModelProto, input_is_reference: bool) -> Path | None:
        """Stage ``--frozen-output`` and return the verification reference (None without
        verification): the input file itself where ``input_is_reference`` and it is unchanged since
        it was read, else the staged frozen output, else a frozen copy in the staging folder.
        ``model`` (the frozen, unfolded model) must already be prepared for saving."""
        reference = self.loaded.path if input_is_reference else None
        frozen: Written | None = None
        if self.frozen_output is not None:
            frozen = self._stage(model, self.frozen_output)
            publish_model(self.outputs, self.frozen_output, frozen)
        if reference is not None and file_stamp(reference, self.loaded.locations) != self.loaded.stamp:
            reference = None  # the input changed since it was read
        if not self.verify:
            return None
        if reference is None and frozen is not None:
            reference = frozen.path  # just written: the frozen model, no second copy
        if reference is None:
            reference = self._scratch(model, "frozen.onnx")
        return reference

    def write_candidate(self, model: onnx.ModelProto) -> Written:
        """Write the folded model into the staging folder (not yet registered for OUTPUT)."""
        if self.output is None:
            return Written(self._scratch(model, "folded.onnx"), "")
        return self._stage(model, self.output)

    def publish(self, staged: Written) -> Path:
        """Register the staged model (and its data file) for OUTPUT on the next commit."""
        assert self.output is not None
        publish_model(self.outputs, self.output, staged)
        return self.output


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
