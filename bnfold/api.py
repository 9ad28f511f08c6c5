"""The public API: load → calibrate → freeze → plan → fold → verify → report.

``fold`` runs the whole pipeline; ``inspect`` stops after planning. Each stage lives in its own
module; this one only wires them together and fills the report.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping

import numpy as np
import onnx

from bnfold.data.sources import CalibrationData, InputSpec, from_arrays, open_data
from bnfold.errors import BadInputError, UnsupportedModelError
from bnfold.formulas.stats import finalize, gap_warning
from bnfold.gcpause import without_gc
from bnfold.onnx.io import (
    LoadedModel,
    file_stamp,
    ir_version_for_save,
    load_onnx,
    prepare_for_save,
    save_onnx,
    stamp_bytes,
)
from bnfold.records import BnRecord, FoldDecision, FrozenStats, Mode, Report, VerifyResult
from bnfold.stages.calibrate import calibrate
from bnfold.stages.discover import BnSite, training_bn_names
from bnfold.stages.fold import apply_plan
from bnfold.stages.freeze import freeze
from bnfold.stages.plan import make_plan
from bnfold.stages.work import Work

if TYPE_CHECKING:  # pragma: no cover
    from bnfold.verify.engine import VerifyConfig

ESTIMATORS = ("unbiased", "pooled")

DataArg = "str | os.PathLike[str] | Mapping[str, np.ndarray] | CalibrationData | None"


@dataclass
class FoldResult:
    model: onnx.ModelProto | None  # None on a dry run
    report: Report

    @property
    def ok(self) -> bool:
        """False iff verification ran and failed."""
        v = self.report.verification
        return v is None or v.passed


@dataclass(frozen=True)
class BnInspection:
    name: str
    mode: Mode
    producer: str | None
    producer_op: str | None
    channels: int | None
    decision: FoldDecision
    graph_path: str = ""


# ---- stages wired together ----------------------------------------------------------------
def _load(model: str | os.PathLike[str] | onnx.ModelProto) -> LoadedModel:
    if isinstance(model, onnx.ModelProto):  # never mutate the caller's model
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return load_onnx(copy)
    return load_onnx(model)


def _input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    from bnfold.onnx.runtime import input_specs

    return input_specs(model)


def _fixed_batch(specs: list[InputSpec]) -> int | None:
    """The batch size every input fixes on axis 0, if any does."""
    fixed = {s.shape[0] for s in specs if s.shape and s.shape[0] is not None}
    return fixed.pop() if len(fixed) == 1 else None


def _open_data(data, model: onnx.ModelProto, batch_size: int | None) -> CalibrationData:
    specs = _input_specs(model)
    fixed = _fixed_batch(specs)
    if fixed is not None:
        if batch_size is None:
            batch_size = fixed
        elif batch_size != fixed:
            name = next(s.name for s in specs if s.shape and s.shape[0] is not None)
            raise BadInputError(
                f"model input '{name}' has a fixed batch size of {fixed}; use --batch-size {fixed} "
                "or export the model with a dynamic batch axis"
            )
    if isinstance(data, CalibrationData):
        cal = data
    elif isinstance(data, Mapping):
        cal = from_arrays(data, specs, batch_size)
    else:
        cal = open_data(data, specs, batch_size)
    if fixed is not None and cal.num_samples % fixed:
        if cal.num_samples < fixed:
            raise BadInputError(
                f"{cal.num_samples} calibration samples, fewer than the model's fixed batch size {fixed}; "
                f"give at least {fixed} samples")
        return _FullBatches(cal)
    return cal


class _FullBatches:
    """Calibration data without its short last batch (a fixed-batch model cannot run it)."""

    def __init__(self, data: CalibrationData) -> None:
        self._data = data
        self.batch_size = data.batch_size
        self.num_samples = data.num_samples - data.num_samples % data.batch_size
        self.dropped = data.num_samples - self.num_samples
        self.num_batches = self.num_samples // self.batch_size

    def __iter__(self):
        for k, batch in enumerate(self._data):
            if k < self.num_batches:
                yield batch

    def take(self, k: int) -> dict[str, np.ndarray]:
        return self._data.take(min(k, self.num_samples))


def _check_modes(work: Work, have_data: bool) -> None:
    for site in work.sites:
        info = site.info
        if info.mode is Mode.INFERENCE:
            continue
        if site.pos is None:
            raise UnsupportedModelError(
                f"BN '{info.name}' inside {info.graph_path} is in training mode; bnfold cannot calibrate "
                "BN inside subgraphs or functions: export the model with the BN in eval mode"
            )
        if not have_data:
            raise BadInputError(
                f"BN '{info.name}' is in {info.mode.value} mode (batch statistics); pass calibration "
                "data with --data so bnfold can compute its population statistics"
            )


def _calibrate_and_freeze(work: Work, data: CalibrationData, estimator: str, progress) -> tuple[
        dict[str, FrozenStats], list[str]]:
    raw = calibrate(work, data, progress)
    frozen = {name: finalize(st, estimator, name) for name, st in raw.items()}
    gap = gap_warning(frozen)
    warnings = [gap] if gap else []
    for site in work.sites:
        if site.pos is None and site.info.mode is Mode.INFERENCE:
            warnings.append(f"BN '{site.info.name}' in {site.info.graph_path} keeps its stored statistics "
                            "(subgraphs are not calibrated)")
    freeze(work, frozen)
    return frozen, warnings


def _verify_batches(data: CalibrationData | None, model: onnx.ModelProto, k: int) -> list[dict[str, np.ndarray]] | str:
    """Batch-size-1 feeds for verification, or a string saying why there are none."""
    specs = _input_specs(model)
    bs = _fixed_batch(specs) or 1
    if data is not None:
        taken = data.take(k * bs)
        n = next(iter(taken.values())).shape[0]
        if n < bs:
            return f"fewer calibration samples ({n}) than the model's fixed batch size {bs}"
        return [{name: arr[i:i + bs] for name, arr in taken.items()} for i in range(0, n - bs + 1, bs)]
    rng = np.random.default_rng(0)
    feeds: list[dict[str, np.ndarray]] = []
    for _ in range(k):
        feed = {}
        for spec in specs:
            if spec.shape is None or any(d is None for d in spec.shape[1:]):
                return f"input '{spec.name}' has dynamic dimensions; pass --data to verify"
            shape = (bs,) + tuple(spec.shape[1:])
            if spec.dtype.kind == "f":
                feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
            elif spec.dtype.kind in "iu":
                return f"input '{spec.name}' is an integer input; pass --data to verify"
            else:
                return f"input '{spec.name}' has dtype {spec.dtype}; pass --data to verify"
        feeds.append(feed)
    return feeds


def _records(work_sites: list[BnSite], modes: dict[str, Mode], plan, frozen) -> list[BnRecord]:
    by_bn = plan.by_bn()
    out = []
    for site in work_sites:
        d = by_bn[site.info.name]
        out.append(BnRecord(
            name=site.info.name, mode_before=modes.get(site.info.name, site.info.mode), action=d.action,
            target=d.target, direction=d.direction, reason=d.reason, detail=d.detail,
            channels=site.info.channels, stats=frozen.get(site.info.name)))
    return out


@without_gc
def fold(
    model: str | os.PathLike[str] | onnx.ModelProto,
    *,
    output: str | os.PathLike[str] | None = None,
    data=None,
    batch_size: int | None = None,
    estimator: str = "unbiased",
    verify: bool = True,
    dry_run: bool = False,
    verify_samples: int = 4,
    atol: float | None = None,
    rtol: float | None = None,
    progress: Callable[[int, int], None] | None = None,
    verify_config: "VerifyConfig | None" = None,
    frozen_output: str | os.PathLike[str] | None = None,
) -> FoldResult:
    """Freeze (with ``data``), fold and verify one ONNX model.

    ``data``: a ``.npz``/``.npy`` path or directory, a mapping of input name to array (leading
    axis = samples), or a ``CalibrationData``. With data every BN is recalibrated (Algorithm 2,
    or the pooled variance with ``estimator='pooled'``); without, inference BNs keep their stored
    statistics and a training-mode BN is an error. ``output`` is written atomically, and only
    when verification passed (or was switched off); on a dry run nothing is written.
    ``frozen_output``: also write the frozen, unfolded model (the verification reference), e.g.
    for a later ``bnfold verify FROZEN FOLDED`` in CI.
    ``verify_config`` (``bnfold.verify.engine.VerifyConfig``) sets providers, tolerances, the
    error statistic and the repro directory; ``atol``/``rtol`` override its global tolerances.
    """
    if estimator not in ESTIMATORS:
        raise BadInputError(f"unknown estimator '{estimator}'; use one of: {', '.join(ESTIMATORS)}")
    if verify_samples < 1:
        raise BadInputError("verify_samples must be at least 1")
    loaded = _load(model)
    work = Work(loaded)
    modes = {s.info.name: s.info.mode for s in work.sites}
    _check_modes(work, data is not None)
    cal = _open_data(data, work.model, batch_size) if data is not None else None
    frozen: dict[str, FrozenStats] = {}
    warnings: list[str] = []
    if cal is not None:
        frozen, warnings = _calibrate_and_freeze(work, cal, estimator, progress)
        if isinstance(cal, _FullBatches):
            warnings.append(f"the last {cal.dropped} calibration sample(s) were not used: the model's "
                            f"fixed batch size {cal.batch_size} does not divide {cal.num_samples + cal.dropped}")
    report = Report(
        input_path=str(loaded.path) if loaded.path else None, output_path=None,
        input_sha256=None, output_sha256=None, estimator=estimator,  # input hash: set below (still computing)
        batch_size=cal.batch_size if cal is not None else None, calibrated=cal is not None, bns=[],
        warnings=warnings, dry_run=dry_run,
        extra={"calibration_samples": cal.num_samples} if cal is not None else {})

    plan, routes = make_plan(work)
    planned = work.sites  # the BNs the plan decides on (a committed fold re-indexes the work)
    if dry_run:
        final = apply_plan(work, plan, routes, commit=False)
        report.bns = _records(work.sites, modes, final, frozen)
        report.input_sha256 = loaded.sha256
        return FoldResult(None, report)

    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
    if frozen_output:
        Path(frozen_output).parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".bnfold-", dir=Path(output).parent if output else None)) \
        if (verify or output) else None
    try:
        # nothing frozen: the input file itself is the reference, unless something differs
        reference = _input_as_reference(work) if verify and cal is None else None
        prepare_for_save(work.model)  # an IR the installed onnxruntime accepts, for both models
        size = stamp_bytes(loaded.stamp)  # the input's size: about the output's
        if frozen_output:
            save_onnx(work.model, frozen_output, external_data=loaded.external_data, size_hint=size)
        if reference is not None and file_stamp(reference, loaded.locations) != loaded.stamp:
            reference = None  # the input changed since it was read
        if verify and reference is None and frozen_output and not _same_file(frozen_output, output):
            reference = Path(frozen_output)  # just written: the frozen model, no second copy
        if verify and reference is None:
            reference = stage / "frozen.onnx"
            save_onnx(work.model, reference, external_data=loaded.external_data, size_hint=size)
        final = apply_plan(work, plan, routes, commit=True)
        report.bns = _records(planned, modes, final, frozen)
        report.input_sha256 = loaded.sha256
        prepare_for_save(work.model)
        if stage is not None:
            staged = stage / (Path(output).name if output else "folded.onnx")
            digest = save_onnx(work.model, staged, external_data=loaded.external_data, size_hint=size)
            if verify:
                batches = _verify_batches(cal, work.model, verify_samples)
                if isinstance(batches, str):
                    report.warnings.append(f"verification skipped: {batches}")
                else:
                    report.verification = _run_verification(
                        reference, staged, batches, verify_config, atol, rtol,
                        {"source": "data" if cal is not None else "random", "seed": None if cal else 0,
                         "samples": verify_samples, "batch_size": _fixed_batch(_input_specs(work.model)) or 1})
            if output and (report.verification is None or report.verification.passed):
                _move_into_place(staged, Path(output), loaded.external_data)
                report.output_path, report.output_sha256 = str(output), digest
        return FoldResult(work.model, report)
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)


def _same_file(a: str | os.PathLike[str], b: str | os.PathLike[str] | None) -> bool:
    return b is not None and Path(a).resolve() == Path(b).resolve()


def _input_as_reference(work: Work) -> Path | None:
    """The input file, where it is the frozen model as ``fold`` would write it, else None.

    Called before anything is frozen or folded (the caller checks that nothing was calibrated),
    while the model in memory is still the input as read. Writing that model again (all its
    weights, gigabytes for some models) would give the same graph and the same tensors with
    only the producer fields changed, so the input file is used as the verification reference
    when: it was read from a file; its IR version is the one ``prepare_for_save`` writes (else
    onnxruntime may refuse it, or the written model would differ); no node was renamed
    (``name_nodes``: fold-site results carry the reference's BN node names, which must be the
    report's); every external-data file lies inside the model's folder as a relative path (as
    onnxruntime requires); and the caller checks just before using it that the files were not
    changed since they were read (``file_stamp``). In any doubt the frozen model is written.
    """
    loaded = work.loaded
    path = loaded.path
    if path is None or not loaded.stamp or work.renamed:
        return None
    if ir_version_for_save(work.model) != work.model.ir_version:
        return None
    try:
        folder = path.resolve().parent
        if path.parent.resolve() != folder:  # a link to a model in another folder
            return None
        for location in loaded.locations:
            rel = Path(location)
            if rel.is_absolute() or ".." in rel.parts:
                return None
            if not (path.parent / rel).resolve().is_relative_to(folder):
                return None
    except (OSError, RuntimeError, ValueError):
        return None
    return path


def _run_verification(reference: Path, candidate: Path, batches, config, atol, rtol, inputs) -> VerifyResult:
    from dataclasses import replace

    from bnfold.verify.engine import VerifyConfig, verify

    config = config or VerifyConfig()
    if atol is not None:
        config = replace(config, atol=(atol, config.atol[1]))
    if rtol is not None:
        config = replace(config, rtol=(rtol, config.rtol[1]))
    # the staged models vanish after fold: a repro bundle gets copies of them
    config = replace(config, inputs=dict(inputs, **config.inputs), repro_copy_models=True)
    return verify(reference, candidate, batches, config)


def _move_into_place(staged: Path, output: Path, external: bool) -> None:
    """Data file first (under its fresh name), then the model; stale data files last.

    A model read without external data has one too where it was too large for one protobuf.
    """
    from bnfold.onnx.io import data_files, remove_stale_data

    assert staged.name == output.name  # the model names its data file after itself
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
    if external or keep:
        remove_stale_data(output, keep=keep)


def _placeholder_stats(work: Work, site: BnSite) -> FrozenStats:
    scale = work.consts.value(work.index.nodes[site.pos].input[1])
    c = int(scale.shape[0]) if scale is not None and scale.ndim == 1 else 1
    zero, one = np.zeros(c), np.ones(c)
    return FrozenStats(zero, one, one, one, 0.0, 0, 0)


@without_gc
def inspect(model: str | os.PathLike[str] | onnx.ModelProto) -> list[BnInspection]:
    """Every BN with its producer, mode and the decision ``fold`` would take (stored statistics).

    Training-mode BNs are planned as if frozen: the decision does not depend on the statistics,
    except DTYPE_OVERFLOW, which ``fold --dry-run`` with data checks exactly.
    """
    work = Work(_load(model))
    modes = {s.info.name: s.info.mode for s in work.sites}
    pending = [s for s in work.sites if s.pos is not None and s.info.mode is not Mode.INFERENCE]
    if pending:  # plan as fold would: after freezing (placeholder statistics; decomposition removed)
        placeholder = {s.info.name: _placeholder_stats(work, s) for s in pending}
        freeze(work, placeholder)
    plan, routes = make_plan(work)
    # the arithmetic check needs statistics: only BNs that already have them are checked here
    checked = {bn: r for bn, r in routes.items() if modes[bn] is Mode.INFERENCE}
    by_bn = apply_plan(work, plan, checked, commit=False).by_bn()
    return [BnInspection(s.info.name, modes[s.info.name], s.info.producer, s.info.producer_op, s.info.channels,
                         by_bn[s.info.name], s.info.graph_path) for s in work.sites]


def check_equivalence(
    reference: str | os.PathLike[str],
    candidate: str | os.PathLike[str],
    *,
    data: str | os.PathLike[str] | None = None,
    batch_size: int = 1,
    seed: int = 0,
    val_range: tuple[float, float] = (0.0, 1.0),
    iterations: int | None = None,
    config: "VerifyConfig | None" = None,
) -> VerifyResult:
    """``bnfold verify`` as a function: does ``candidate`` compute ``reference``'s function?

    Inputs come from ``data`` (its first ``iterations`` batches, all when None) or are drawn
    uniformly from ``val_range`` with ``seed`` (``iterations`` batches, default 1).
    """
    from dataclasses import replace

    from bnfold.verify.engine import VerifyConfig, verify
    from bnfold.verify.feeds import data_feeds, random_feeds

    for path in (reference, candidate):
        if not Path(path).is_file():
            raise BadInputError(f"model file not found: {path}")
    ref_model = onnx.load(os.fspath(reference), load_external_data=False)
    specs = _input_specs(ref_model)
    training = training_bn_names(ref_model)
    del ref_model
    if data is not None:
        feeds, info = data_feeds(data, specs, batch_size=batch_size, iterations=iterations)
    else:
        feeds, info = random_feeds(specs, seed=seed, val_range=val_range, iterations=iterations or 1,
                                   batch_size=batch_size)
    config = config or VerifyConfig()
    result = verify(reference, candidate, feeds, replace(config, inputs=dict(info, **config.inputs)))
    if training and not result.passed:
        # its outputs depend on the rest of the batch: no folded (frozen) model reproduces them
        names = ", ".join(f"'{n}'" for n in training[:3]) + (" ..." if len(training) > 3 else "")
        note = (f"REFERENCE has {len(training)} BN in training mode ({names}): it normalises with each batch's "
                "statistics, which a folded model does not; verify against the frozen model "
                "(bnfold fold --frozen-output FROZEN.onnx)")
        result = replace(result, note=f"{result.note}; {note}" if result.note else note)
    return result
