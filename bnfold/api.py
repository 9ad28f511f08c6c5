"""The public API: ``fold``, ``inspect`` and ``verify``, and the types they return.

``fold`` runs load -> calibrate -> freeze -> plan -> fold -> verify and returns the report;
``inspect`` stops after planning; ``verify`` runs only the verify stage on two model files. The
stages live in ``bnfold/stages`` (each takes the ``Work`` and returns its result), file staging
in ``bnfold/onnx/staging.py``; this module only calls them in order and builds the records.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeAlias, TypeVar, cast

import numpy as np
import onnx

from bnfold.api_checks import (
    check_callable,
    check_config,
    check_count,
    check_data,
    check_model,
    check_path,
    check_seed,
    check_val_range,
)
from bnfold.data.sources import Batches, CalibrationData, from_arrays, open_data
from bnfold.data.stream import StreamData, StreamSource, is_stream_source
from bnfold.data.supplied import supplied_specs
from bnfold.distributed import Group, RankShard, gather_calibration, resolve_group, threads_per_rank
from bnfold.distributed.combine import decode_stats, encode_stats, gathers_done, join_missed_gather, merge_ranks
from bnfold.errors import BadInputError, BnfoldError, UnsupportedModelError
from bnfold.files import check_not_input, check_output_paths
from bnfold.formulas.stats import ESTIMATORS, finalize, gap_warning
from bnfold.formulas.sufficiency import DEFAULT_TARGET_SE, check_target_se, sufficiency_warning
from bnfold.onnx.deferred import materialize
from bnfold.onnx.io import LoadedModel, load_onnx, prepare_for_save, read_model
from bnfold.onnx.io import model_files as model_files  # re-exported: the CLI's verify protects the models
from bnfold.onnx.runtime import input_specs
from bnfold.onnx.staging import Staging, input_is_reference
from bnfold.outputs import Outputs
from bnfold.records import BnStats, Drift, FrozenStats, InputSpec, Mode
from bnfold.run_records import BnRecord, FoldDecision, FoldPlan, Report, VerifyResult
from bnfold.stages.batch_axis import batch_axis_warnings
from bnfold.stages.calibrate import calibrate
from bnfold.stages.discover import BnSite, training_bn_names
from bnfold.stages.drift import drifts, stored_stats
from bnfold.stages.fold import apply_plan
from bnfold.stages.freeze import check_stored_stats, check_variances, freeze
from bnfold.stages.plan import make_plan
from bnfold.stages.work import Work
from bnfold.verification.config import VerifyConfig
from bnfold.verification.engine import verify as run_verify
from bnfold.verification.feeds import data_feeds, fixed_batch, fold_verification_feeds, random_verification_feeds
from bnfold.verification.shape_spec import normalize_input_shapes

#: calibration data: a .npz/.npy path or folder, {input name: array} (leading axis = samples), opened data, or
#: any iterable of batches (``bnfold.data.stream``: dicts of input name -> array or tensor, bare arrays)
DataArg: TypeAlias = "str | os.PathLike[str] | Mapping[str, np.ndarray] | CalibrationData | Iterable[Any]"
#: shapes for inputs with dynamic dims: {name: (1, 3, 640, 640) or "1x3x640x640"}, or "NAME:1x3x640x640" strings
InputShapes: TypeAlias = "Mapping[str, Sequence[int] | str] | Iterable[str]"

#: ``fold(recalibrate=...)``: which BNs the data re-estimates. "training": only those that
#: normalise with batch statistics (training_mode=1, the decomposed pattern); "all": every
#: main-graph BN (BN re-estimation, as torch.optim.swa_utils.update_bn does)
RECALIBRATE = ("training", "all")


@dataclass(frozen=True)
class BnInspection:
    """One BN as planned: its mode before bnfold, its producer, and the decision taken for it."""

    name: str
    mode: Mode
    producer: str | None
    producer_op: str | None
    channels: int | None
    decision: FoldDecision
    graph_path: str = ""
    drift: Drift | None = None  # with data: stored vs the data's statistics (None without data)


class FoldResult:
    """What ``fold`` returns: the folded model (None on a dry run), the report, and the plan rows
    (``inspect``'s rows with the decisions this run took, e.g. DTYPE_OVERFLOW checked on data).

    External tensors of 64 MiB or more that bnfold never needed stay in their file while it runs
    (``bnfold/onnx/deferred.py``); ``model`` reads them in on first access, so the model a caller
    gets holds all its data, as ``onnx.load`` would give it.
    """

    def __init__(self, model: onnx.ModelProto | None, report: Report, rows: list[BnInspection] | None = None) -> None:
        self._model = model
        self._complete = model is None
        self.report = report
        self.rows: list[BnInspection] = rows if rows is not None else []

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (to another process: ``ProcessPoolExecutor``, ``Pool.map``) with its deferred
        tensors read in: only the process that loaded the model can read them."""
        state = self.__dict__.copy()
        state["_model"], state["_complete"] = self.model, True
        return state

    @property
    def model(self) -> onnx.ModelProto | None:
        if not self._complete:
            assert self._model is not None
            materialize(self._model)
            self._complete = True
        return self._model

    @property
    def ok(self) -> bool:
        """False iff verification ran and failed."""
        v = self.report.verification
        return v is None or v.passed

    def __repr__(self) -> str:
        return f"FoldResult(report={self.report!r}, rows={len(self.rows)} BN)"


def _load(model: str | os.PathLike[str] | onnx.ModelProto) -> LoadedModel:
    if isinstance(model, onnx.ModelProto):  # never mutate the caller's model
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return load_onnx(copy)
    return load_onnx(model)


def _open_data(data: DataArg, model: onnx.ModelProto, batch_size: int | None, keep: int = 0
               ) -> CalibrationData | _FullBatches | StreamData:
    """``data`` opened for ``model``'s inputs; ``keep``: the samples a stream holds for verification."""
    source = StreamSource(data) if is_stream_source(data) else None  # reads the first batch: its input names
    every = input_specs(model)
    specs = supplied_specs(source or data, every)  # inputs that are not samples may be left out
    fixed = fixed_batch(specs)
    if fixed is not None:
        if batch_size is None:
            batch_size = fixed
        elif batch_size != fixed:
            name = next(s.name for s in specs if s.shape and s.shape[0] is not None)
            raise BadInputError(
                f"model input '{name}' has a fixed batch size of {fixed}; use batch_size={fixed} "
                "or export the model with a dynamic batch axis"
            )
    if source is not None:
        return StreamData(source, specs, batch_size, fixed=fixed, keep=keep,
                          model_inputs=[spec.name for spec in every])
    if isinstance(data, CalibrationData):
        cal = data
    elif isinstance(data, Mapping):
        cal = from_arrays(data, specs, batch_size)
    else:
        cal = open_data(cast("str | os.PathLike[str]", data), specs, batch_size)
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

    @property
    def inputs(self) -> tuple[InputSpec, ...]:
        return self._data.inputs

    @property
    def notes(self) -> tuple[str, ...]:
        return self._data.notes

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self._data.batches_from(0, 1, self.num_batches)

    def batches_from(self, start: int, step: int) -> Iterator[dict[str, np.ndarray]]:
        return self._data.batches_from(start, step, self.num_batches)

    def fingerprint(self) -> str:
        return self._data.fingerprint()

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
                "data (the data argument) so bnfold can compute its population statistics"
            )


def _selected(work: Work, recalibrate: str) -> set[str]:
    """The main-graph BNs that ``recalibrate`` re-estimates."""
    return {s.info.name for s in work.sites
            if s.pos is not None and (recalibrate == "all" or s.info.mode is not Mode.INFERENCE)}


def _calibrate_ranks(work: Work, data: Batches, progress: Callable[[int, int | None], None] | None, only: set[str],
                     group: Group | None) -> dict[str, BnStats]:
    """The calibrate stage on one process, or across ``group``: this rank runs batches j mod N of
    ``data`` (files and arrays: every rank opened all of it), then every rank's sums are all-gathered
    and merged in rank order (``bnfold.distributed``); a rank that fails stops the others."""
    if not only:
        return {}
    if group is None:
        return calibrate(work, data, progress, only=only)
    own_part = isinstance(data, StreamData) and not data.shared  # a user's iterable: this rank's part
    shard: Any = data if own_part else RankShard(data, group.rank, group.world_size)
    threads = threads_per_rank()
    per_rank = gather_calibration(group, lambda: encode_stats(calibrate(work, shard, progress, only=only,
                                                                        threads=threads)),
                                  key=_rank_key(work, data, only, own_part))
    return merge_ranks([decode_stats(p) for p in per_rank])


def _rank_key(work: Work, data: Batches, only: set[str], own_part: bool) -> dict[str, Any]:
    """What every rank must agree on before their statistics merge: the model (its file's digest,
    else its graph's), the calibrated BNs and their channels, and the batches (size, and the count
    where every rank reads the whole data)."""
    digest = work.loaded.sha256 or hashlib.sha256(work.model.graph.SerializeToString()).hexdigest()
    channels = sorted((s.info.name, s.info.channels or 0) for s in work.sites if s.info.name in only)
    shape = hashlib.sha256(repr(channels).encode()).hexdigest()
    key: dict[str, Any] = {"model sha256": digest[:12], "BNs": f"{len(channels)} ({shape[:8]})"}
    if not own_part:  # a rank's own part (DistributedSampler style) may hold other batches
        key.update({"batch size": data.batch_size, "batches": getattr(data, "num_batches", None)})
        fingerprint = getattr(data, "fingerprint", None)  # files and arrays: their content too
        if fingerprint is not None:
            key["data sha256"] = fingerprint()[:12]
    return key


def _calibrate_and_freeze(work: Work, data: Batches, estimator: str, recalibrate: str,
                          progress: Callable[[int, int | None], None] | None, target_se: float = DEFAULT_TARGET_SE,
                          group: Group | None = None
                          ) -> tuple[dict[str, FrozenStats], dict[str, Drift], list[str]]:
    """The calibrate and freeze stages: population statistics written into the BNs ``recalibrate``
    selects (with ``'all'``, each one's drift from its stored statistics), and the warnings."""
    only = _selected(work, recalibrate)
    raw = _calibrate_ranks(work, data, progress, only, group)
    frozen = {name: finalize(st, estimator, name, target_se) for name, st in raw.items()}
    drift = drifts(work, frozen) if recalibrate == "all" else {}  # before freeze replaces the stored values
    warnings = [w for w in (gap_warning(frozen), sufficiency_warning(frozen)) if w]
    for site in work.sites:
        if site.pos is None and site.info.mode is Mode.INFERENCE:
            warnings.append(f"BN '{site.info.name}' in {site.info.graph_path} keeps its stored statistics "
                            "(subgraphs are not calibrated)")
    if frozen:
        freeze(work, frozen)
    warnings.extend(getattr(data, "notes", ()))  # what the data's reader passed over
    dropped = getattr(data, "dropped", 0)  # _FullBatches, or a stream re-chunked to the fixed batch size
    if dropped:
        warnings.append(f"the last {dropped} calibration sample(s) were not used: the model's "
                        f"fixed batch size {data.batch_size} does not divide {data.num_samples + dropped}")
    return frozen, {n: d for n, d in drift.items() if n in frozen}, warnings


def _records(work_sites: list[BnSite], modes: dict[str, Mode], plan: FoldPlan, frozen: dict[str, FrozenStats],
             drift: dict[str, Drift] | None = None) -> list[BnRecord]:
    by_bn = plan.by_bn()
    out = []
    for site in work_sites:
        d = by_bn[site.info.name]
        out.append(BnRecord(
            name=site.info.name, mode_before=modes.get(site.info.name, site.info.mode), action=d.action,
            target=d.target, direction=d.direction, reason=d.reason, detail=d.detail,
            channels=site.info.channels, stats=frozen.get(site.info.name),
            drift=(drift or {}).get(site.info.name)))
    return out


_F = TypeVar("_F", bound=Callable[..., Any])


def _sends_early_errors(fn: _F) -> _F:
    """In a process group: an error this rank raises before it reaches the calibration gather (its
    arguments, its model, its data) is sent through that gather, so the other ranks stop at once
    with ``rank K failed: <its message>`` instead of waiting out the timeout with a bare
    "stopped answering" (a rank that got past the gather sends nothing more)."""
    @functools.wraps(fn)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        since = gathers_done()
        try:
            return fn(*args, **kwargs)
        except BaseException as exc:
            try:
                group = resolve_group(kwargs.get("distributed", "auto")) if gathers_done() == since else None
            except BnfoldError:  # a bad ``distributed`` argument: raised as it is, on every rank alike
                group = None
            if group is not None:
                join_missed_gather(group, since, exc)
            raise
    return cast(_F, guarded)


@_sends_early_errors
def fold(
    model: str | os.PathLike[str] | onnx.ModelProto,
    *,
    output: str | os.PathLike[str] | None = None,
    data: DataArg | None = None,
    batch_size: int | None = None,
    estimator: str = "unbiased",
    verify: bool = True,
    dry_run: bool = False,
    verify_samples: int = 4,
    progress: Callable[[int, int | None], None] | None = None,
    verify_config: VerifyConfig | None = None,
    frozen_output: str | os.PathLike[str] | None = None,
    outputs: Outputs | None = None,
    input_shapes: InputShapes | None = None,
    recalibrate: str = "training",
    target_se: float = DEFAULT_TARGET_SE,
    distributed: bool | str = "auto",
) -> FoldResult:
    """Freeze (with ``data``), fold and verify one ONNX model.

    ``data``: a ``.npz``/``.npy`` path or directory, a mapping of input name to array (leading
    axis = samples), or a ``CalibrationData``. With data the BNs ``recalibrate`` names get
    population statistics (Algorithm 2, or the pooled variance with ``estimator='pooled'``):
    ``'training'`` (default) only those that normalise with batch statistics (training_mode=1 or
    the decomposed pattern), while inference BNs keep their stored statistics (the calibration
    network normalises them with those, as the deployed model will); ``'all'`` re-estimates every
    main-graph BN and records each one's ``drift`` from its stored statistics. Without data, inference
    BNs keep their stored statistics and a training-mode BN is an error; the data is also what
    verification runs on. ``output`` is written atomically, and only
    when verification passed (or was switched off); on a dry run nothing is written.
    ``frozen_output``: also write the frozen, unfolded model (the verification reference), e.g.
    for a later ``bnfold verify FROZEN FOLDED`` in CI; written whenever the run ends with a
    verdict (also when verification failed), never when it ends in an error.
    ``outputs``: an :class:`bnfold.outputs.Outputs` the models are staged in and left for the
    caller to commit together with its own files (e.g. reports); by default ``fold`` commits them.
    ``verify_config`` (``VerifyConfig``) sets providers, tolerances, the error statistic and the
    repro directory.
    ``input_shapes``: the full shape (batch included) at which verification feeds an input whose
    non-batch dims are dynamic, e.g. ``{"x": (1, 3, 640, 640)}``; without one, the model's hints or a
    probe size it runs at (``bnfold.verification.shapes``; the report's ``verification.inputs.shapes``
    says which). When no shape works, :class:`BadInputError`: a model is written unverified only
    with ``verify=False``.
    ``target_se``: the standard error the calibrated statistics should reach (0.01 = 1 %); each
    frozen BN's ``stats.sufficiency`` says how far its data is from it, and a warning names the
    BNs that miss it (``bnfold.formulas.sufficiency``, docs/math.md section 2.2).
    ``distributed`` (``"auto"``, True, False): inside an initialised ``torch.distributed`` group of
    more than one process (``"auto"``), every rank calls ``fold`` with the same arguments; each runs
    calibration batches j mod N of ``data`` (files and arrays; an iterable is taken as the rank's own
    part, ``DistributedSampler`` style) and all get the same merged statistics
    (``bnfold.distributed``; README, "Distributed calibration"). Rank 0 alone writes ``output`` and
    ``frozen_output`` and verifies; the other ranks return the same folded model, unverified.
    """
    group = resolve_group(distributed)
    if group is not None and group.rank != 0:  # rank 0 alone writes and verifies
        output = frozen_output = None
        verify = False
    check_model(model)
    check_path(output, "output")
    check_path(frozen_output, "frozen_output")
    check_data(data)
    check_count(batch_size, "batch_size", optional=True, label="batch size")
    check_count(verify_samples, "verify_samples")
    check_callable(progress, "progress")
    check_config(verify_config, "verify_config")
    given_shapes = normalize_input_shapes(input_shapes)
    target_se = check_target_se(target_se)
    if estimator not in ESTIMATORS:
        raise BadInputError(f"unknown estimator '{estimator}'; use one of: {', '.join(ESTIMATORS)}")
    _check_recalibrate(recalibrate, data is not None)
    if not dry_run:
        check_output_paths(output=output, frozen_output=frozen_output)
    loaded = _load(model)
    if not dry_run:
        check_not_input(loaded.path, output=output, frozen_output=frozen_output)
    work = Work(loaded)
    modes = {s.info.name: s.info.mode for s in work.sites}
    _check_modes(work, data is not None)
    keep = verify_samples * (fixed_batch(input_specs(work.model)) or 1) if verify and not dry_run else 0
    cal = _open_data(data, work.model, batch_size, keep) if data is not None else None
    if cal is not None and given_shapes:  # before calibration, not after it (and on a dry run too)
        from_data = sorted(set(given_shapes) & {s.name for s in cal.inputs})
        if from_data:
            raise BadInputError(f"input '{from_data[0]}' is fed from the data, at the data's shape; give input "
                                "shapes only for the inputs the data does not supply")
    if cal is not None and recalibrate == "training":  # kept statistics: refused before calibrating, not after
        _check_kept_stats(work)
    # before freezing edits the graph; a model fixed to batches of one mixes no samples
    unrecognised = ([] if fixed_batch(input_specs(work.model)) == 1
                    else batch_axis_warnings(work.index, work.consts, work.sites))
    frozen, drift, warnings = (_calibrate_and_freeze(work, cal, estimator, recalibrate, progress, target_se, group)
                               if cal is not None else ({}, {}, []))
    warnings = unrecognised + warnings
    world = {"world_size": group.world_size if group is not None else 1}
    check_variances(work)
    plan, routes = make_plan(work)
    planned = work.sites  # the BNs the plan decides on (a committed fold re-indexes the work)
    if dry_run:
        final = apply_plan(work, plan, routes, commit=False)
        records = _records(planned, modes, final, frozen, drift)
        return FoldResult(None, _report(loaded, cal, estimator, warnings, records, dry_run=True,
                                        recalibrate=recalibrate, world=world),
                          _rows(planned, modes, final, drift))

    verification: VerifyResult | None = None
    output_path = output_sha256 = None
    with contextlib.ExitStack() as stack:
        tx = outputs if outputs is not None else stack.enter_context(Outputs())
        if loaded.path is not None:  # never replaced or deleted: the input and its data files
            tx.protect("the input model", loaded.path)
            tx.protect(f"a data file of the input model {loaded.path}",
                       *(loaded.path.parent / loc for loc in loaded.locations), named=True)
        staging = Staging(loaded, output, frozen_output, verify=verify, outputs=tx)
        # nothing frozen: the input file itself is the reference, unless something differs
        use_input = verify and not frozen and input_is_reference(loaded, work.model, work.renamed)
        prepare_for_save(work.model)  # an IR the installed onnxruntime accepts, for both models
        reference = staging.write_reference(work.model, use_input)
        final = apply_plan(work, plan, routes, commit=True)
        prepare_for_save(work.model)
        if output is not None or reference is not None:
            staged = staging.write_candidate(work.model)
            if reference is not None:
                names = {reference: "the frozen model" if reference != loaded.path else str(reference),
                         staged.path: f"the folded model (for {output})" if output else "the folded model"}
                with _named_paths(names):  # errors name the user's files, not bnfold's staged copies
                    feeds, shapes = fold_verification_feeds(cal, work.model, verify_samples, reference, given_shapes)
                    verification = _run_verification(
                        reference, staged.path, feeds, verify_config,
                        {"source": "data" if cal is not None else "random", "seed": None if cal else 0,
                         "samples": verify_samples, "batch_size": fixed_batch(input_specs(work.model)) or 1,
                         "shapes": shapes.record()})
            if output and (verification is None or verification.passed):
                output_path, output_sha256 = str(staging.publish(staged)), staged.sha256
        if outputs is None:
            tx.commit()
    report = _report(loaded, cal, estimator, warnings, _records(planned, modes, final, frozen, drift), dry_run=False,
                     verification=verification, output_path=output_path, output_sha256=output_sha256,
                     recalibrate=recalibrate, world=world)
    return FoldResult(work.model, report, _rows(planned, modes, final, drift))


def _check_recalibrate(recalibrate: str, have_data: bool) -> None:
    if recalibrate not in RECALIBRATE:
        raise BadInputError(f"unknown recalibrate='{recalibrate}'; use one of: {', '.join(RECALIBRATE)}")
    if recalibrate == "all" and not have_data:
        raise BadInputError("recalibrate='all' re-estimates every BN on data; pass calibration data (the data "
                            "argument)")


@contextlib.contextmanager
def _named_paths(names: Mapping[Path, str]) -> Iterator[None]:
    """Re-raise a ``BnfoldError`` whose message mentions one of ``names``' paths (a staged copy in a
    ``.bnfold-*`` folder) with the path replaced by what it is."""
    try:
        yield
    except BnfoldError as exc:
        text = str(exc)
        for path, label in sorted(names.items(), key=lambda kv: -len(str(kv[0]))):
            text = text.replace(str(path), label)
        if text == str(exc):
            raise
        raise type(exc)(text) from exc


def _report(loaded: LoadedModel, cal: CalibrationData | _FullBatches | StreamData | None, estimator: str,
            warnings: list[str], bns: list[BnRecord], *, dry_run: bool, verification: VerifyResult | None = None,
            output_path: str | None = None, output_sha256: str | None = None, recalibrate: str = "training",
            world: dict[str, int] | None = None) -> Report:
    calibration: dict[str, int | None] = dict(world or {"world_size": 1})
    if cal is not None:
        # every rank's batches, from the merged statistics (a rank's own data holds only its part)
        seen = [b.stats for b in bns if b.stats is not None]
        counted = [st.sufficiency.samples for st in seen if st.sufficiency is not None]
        calibration["samples"] = max(counted) if counted else cal.num_samples
        calibration["batches"] = max(st.batches for st in seen) if seen else cal.num_batches
    extra: dict[str, Any] = {"calibration_samples": calibration["samples"]} if cal is not None else {}
    return Report(
        input_path=str(loaded.path) if loaded.path else None, output_path=output_path,
        input_sha256=loaded.sha256, output_sha256=output_sha256, estimator=estimator,
        batch_size=cal.batch_size if cal is not None else None, calibrated=cal is not None, bns=bns,
        warnings=warnings, verification=verification, dry_run=dry_run, recalibrate=recalibrate,
        extra={**extra, "calibration": calibration})


def _rows(sites: list[BnSite], modes: dict[str, Mode], plan: FoldPlan, drift: dict[str, Drift] | None = None
          ) -> list[BnInspection]:
    by_bn = plan.by_bn()
    drift = drift or {}
    return [BnInspection(s.info.name, modes.get(s.info.name, s.info.mode), s.info.producer, s.info.producer_op,
                         s.info.channels, by_bn[s.info.name], s.info.graph_path, drift.get(s.info.name))
            for s in sites]


def _run_verification(reference: Path, candidate: Path, feeds: list[dict[str, np.ndarray]],
                      config: VerifyConfig | None, inputs: dict[str, Any]) -> VerifyResult:
    config = config or VerifyConfig()
    # the staged models vanish after fold: a repro bundle gets copies of them
    config = replace(config, inputs=dict(inputs, **config.inputs), repro_copy_models=True)
    return run_verify(reference, candidate, feeds, config)


def _placeholder_stats(work: Work, site: BnSite) -> FrozenStats:
    assert site.pos is not None
    scale = work.consts.default(work.index.nodes[site.pos].input[1])
    c = int(scale.shape[0]) if scale is not None and scale.ndim == 1 else 1
    zero, one = np.zeros(c), np.ones(c)
    return FrozenStats(zero, one, one, one, 0.0, 0, 0)


def _corrupt_stats(work: Work, site: BnSite) -> bool:
    """True where an inference BN's stored mean is not finite or its ``var + epsilon`` is not a
    positive finite number in some channel (what ``check_variances`` refuses)."""
    stored = stored_stats(work, site)
    if site.info.mode is not Mode.INFERENCE or stored is None:
        return False
    mean, var = (np.asarray(a, dtype=np.float64) for a in stored)
    denom = var + site.info.epsilon
    return not (bool(np.isfinite(mean).all()) and bool((np.isfinite(denom) & (denom > 0)).all()))


def _check_kept_stats(work: Work) -> None:
    """Refuse an inference BN whose stored statistics fold with data keeps but are corrupt, naming
    the fix the data allows."""
    for site in work.sites:
        if _corrupt_stats(work, site):
            stored = stored_stats(work, site)
            assert stored is not None
            mean, var = (np.asarray(a, dtype=np.float64) for a in stored)
            try:
                check_stored_stats(site.info.name, mean, var, site.info.epsilon)
            except BadInputError as exc:
                raise BadInputError(f"{exc}; or re-estimate them from the data with recalibrate='all'") from None


def inspect(model: str | os.PathLike[str] | onnx.ModelProto, *, data: DataArg | None = None,
            batch_size: int | None = None, progress: Callable[[int, int | None], None] | None = None,
            distributed: bool | str = "auto") -> list[BnInspection]:
    """Every BN with its producer, mode and the decision ``fold`` would take (stored statistics).

    Training-mode BNs are planned as if frozen: the decision does not depend on the statistics,
    except DTYPE_OVERFLOW, which ``fold --dry-run`` with data checks exactly.

    ``data`` (as ``fold``'s): also compute the data's statistics of every BN (Algorithm 2, the
    estimates ``fold(recalibrate='all')`` would write; nothing is written) and give each row its
    ``drift``: how far the stored statistics are from the data's (``bnfold.records.Drift``; a BN
    that normalises with batch statistics has no stored statistics to compare, and its record
    says so). Without data ``drift`` is None. ``distributed``: as ``fold``'s (the data's statistics
    are calibrated across the process group; every rank gets the same rows).
    """
    check_model(model)
    check_data(data)
    check_count(batch_size, "batch_size", optional=True, label="batch size")
    check_callable(progress, "progress")
    group = resolve_group(distributed) if data is not None else None
    work = Work(_load(model))
    modes = {s.info.name: s.info.mode for s in work.sites}
    drift: dict[str, Drift] = {}
    if data is not None:
        cal = _open_data(data, work.model, batch_size)
        only = _selected(work, "all")
        raw = _calibrate_ranks(work, cal, progress, only, group)
        estimates = {name: finalize(st, "unbiased", name) for name, st in raw.items()}
        drift = drifts(work, estimates)
        # corrupt stored statistics (a negative or NaN variance, a NaN mean) are what drift is for: their
        # records say inf and the rows are planned with the data's estimates, as fold(recalibrate='all') would
        corrupt = {s.info.name for s in work.sites if s.info.name in estimates and _corrupt_stats(work, s)}
        if corrupt:
            freeze(work, {name: estimates[name] for name in corrupt})
    pending = [s for s in work.sites if s.pos is not None and s.info.mode is not Mode.INFERENCE]
    if pending:  # plan as fold would: after freezing (placeholder statistics; decomposition removed)
        placeholder = {s.info.name: _placeholder_stats(work, s) for s in pending}
        freeze(work, placeholder)
    check_variances(work)
    plan, routes = make_plan(work)
    # the arithmetic check needs statistics: only BNs that already have them are checked here
    checked = {bn: r for bn, r in routes.items() if modes[bn] is Mode.INFERENCE}
    return _rows(work.sites, modes, apply_plan(work, plan, checked, commit=False), drift)


def verify(
    reference: str | os.PathLike[str],
    candidate: str | os.PathLike[str],
    *,
    data: str | os.PathLike[str] | Iterable[Any] | None = None,
    batch_size: int = 1,
    seed: int = 0,
    val_range: tuple[float, float] = (0.0, 1.0),
    iterations: int | None = None,
    config: VerifyConfig | None = None,
    input_shapes: InputShapes | None = None,
) -> VerifyResult:
    """``bnfold verify`` as a function: does ``candidate`` compute ``reference``'s function?

    Inputs come from ``data`` (a ``.npz``/``.npy`` path or folder, or an iterable of batches as
    :func:`fold` takes; its first ``iterations`` batches of ``batch_size``, all when None) or are drawn
    uniformly from ``val_range`` with ``seed`` (``iterations`` batches, default 1), an input with
    dynamic non-batch dims at its ``input_shapes`` entry, the model's hints or a probe size (as in
    :func:`fold`).
    """
    check_model(reference, "reference", proto=False)
    check_model(candidate, "candidate", proto=False)
    check_data(data)
    check_count(batch_size, "batch_size", label="batch size")
    check_count(iterations, "iterations", optional=True)
    check_seed(seed)
    check_val_range(val_range)
    check_config(config, "config")
    given_shapes = normalize_input_shapes(input_shapes)
    if given_shapes and data is not None:
        raise BadInputError("input_shapes applies to random inputs; with the data argument the data's shapes are fed")
    for path in (reference, candidate):
        if not Path(path).is_file():
            raise BadInputError(f"model file not found: {path}")
    read_model(candidate)  # fold's checks and messages for both files (not ONNX, bad tensors, data files)
    ref_model = read_model(reference)
    specs = input_specs(ref_model)
    training = training_bn_names(ref_model)
    if data is not None and is_stream_source(data):
        feeds, info = _stream_feeds(cast("Iterable[Any]", data), specs, batch_size, iterations)
    elif data is not None:
        feeds, info = data_feeds(cast("str | os.PathLike[str]", data), specs, batch_size=batch_size,
                                 iterations=iterations)
    else:
        feeds, info = random_verification_feeds(reference, ref_model, seed=seed, val_range=val_range,
                                                iterations=iterations or 1, batch_size=batch_size, given=given_shapes)
    del ref_model
    config = config or VerifyConfig()
    result = run_verify(reference, candidate, feeds, replace(config, inputs=dict(info, **config.inputs)))
    if training and not result.passed:
        # its outputs depend on the rest of the batch: no folded (frozen) model reproduces them
        names = ", ".join(f"'{n}'" for n in training[:3]) + (" ..." if len(training) > 3 else "")
        note = (f"REFERENCE has {len(training)} BN in training mode ({names}): it normalises with each batch's "
                "statistics, which a folded model does not; verify against the frozen model "
                "(fold(..., frozen_output='FROZEN.onnx'))")
        result = replace(result, note=f"{result.note}; {note}" if result.note else note)
    return result


def _stream_feeds(data: Iterable[Any], specs: list[Any], batch_size: int, iterations: int | None
                  ) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
    """``verify``'s feeds from an iterable of batches: its first ``iterations`` batches (all when
    None), re-chunked to ``batch_size`` (the model's fixed batch size where it has one)."""
    source = StreamSource(data)
    specs = supplied_specs(source, specs)
    fixed = fixed_batch(specs)
    stream = StreamData(source, specs, fixed or batch_size, fixed=fixed)
    feeds: list[dict[str, np.ndarray]] = []
    for batch in stream:
        if iterations is not None and len(feeds) >= iterations:
            break
        feeds.append(batch)
    return feeds, {"source": "data", "path": stream.source, "batch_size": fixed or batch_size,
                   "iterations": len(feeds)}
