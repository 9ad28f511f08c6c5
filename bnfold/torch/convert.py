"""Module -> calibrated, exported, folded, verified file: :func:`convert`.

:func:`convert` takes an ``nn.Module`` (or a model read by :func:`bnfold.torch.load_model_file` /
:func:`bnfold.torch.load_factory`, which also carries the file it came from) and a calibration data
file, and returns a :class:`ConvertResult`. The output's suffix picks the route:

* **torch** (the module can be fx-traced, output ``.pt2`` / ``.pt`` / ``.ts`` / ``.torchscript``):
  :func:`bnfold.torch.fold` calibrates and folds in PyTorch; the folded module is compared with
  the frozen one in eager mode (``torch_check``), written with ``torch.export`` or
  ``torch.jit.trace``, read back and compared with the folded module (``export_check``).
* **onnx** (output ``.onnx``): the module is calibrated and frozen in PyTorch
  (:func:`bnfold.torch.calibrate`), exported to ONNX, the export compared with PyTorch eager on
  onnxruntime (``export_check``), and the export folded and verified by :func:`bnfold.fold`
  exactly like an ONNX input (``verification``). This is also the route for modules fx cannot
  trace (with a warning) and for TorchScript modules (exported as they are, training-mode BNs
  included, and calibrated by the ONNX pipeline).

A check that fails is a verdict, not an error: the result says which (``failed``) and the output
is not written. Errors (bad input, a model bnfold cannot process) raise :class:`bnfold.BnfoldError`
subclasses whose messages name this function's parameters.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx import numpy_helper
from torch import nn

from bnfold.api import BnInspection
from bnfold.api import fold as onnx_fold
from bnfold.api import inspect as onnx_inspect
from bnfold.api_checks import check_callable, check_config, check_count, check_path
from bnfold.data.sources import CalibrationData, open_data
from bnfold.data.stream import StreamData, StreamSource, is_stream_source
from bnfold.errors import BadInputError, BnfoldError, ProviderUnavailable, UnsupportedModelError, one_line
from bnfold.files import check_output_paths
from bnfold.formulas.sufficiency import DEFAULT_TARGET_SE, check_target_se
from bnfold.output_formats import FORMAT_LABELS, torch_output_format
from bnfold.outputs import Outputs
from bnfold.records import Action, Mode
from bnfold.run_records import BnRecord, FoldDecision, Report, VerifyResult
from bnfold.torch import export as ex
from bnfold.torch.batches import Batch
from bnfold.torch.calibrate import (
    CalibrationRun,
    bn_mode,
    check_recalibrate,
    copy_module,
    find_batchnorms,
    float_dtype,
    is_standard_bn,
    module_device,
    run_calibration,
)
from bnfold.torch.fold import TorchFoldResult, trace
from bnfold.torch.fold import fold as torch_fold
from bnfold.torch.inputs import input_specs, ordered, sample_count, split, stream_input_specs, tensors, to_device
from bnfold.torch.load import FACTORY, TORCHSCRIPT, LoadedTorchModel, forward_inputs, sha256_of
from bnfold.torch.wrappers import unwrap
from bnfold.verification.engine import VerifyConfig

__all__ = ["MODULE", "ConvertResult", "OutputCheck", "TensorCheck", "convert", "resolve_device"]

#: ``report.extra["source"]["kind"]`` of a model given as an in-memory ``nn.Module``
MODULE = "module"

Example = dict[str, torch.Tensor]


@dataclass(frozen=True)
class OutputCheck:
    """One output of a torch or export check."""

    name: str
    dtype: str
    max_abs: float
    max_rel: float
    atol: float
    rtol: float
    passed: bool
    floor_max: float | None = None  # the reference's largest float32 noise floor (None: none)


@dataclass(frozen=True)
class TensorCheck:
    """Two runs of the same inputs compared output by output (``rule``: |a - b| <= atol + rtol*|ref|,
    or within the margin times the reference's noise floor from a float64 run of the module)."""

    max_abs: float
    max_rel: float
    passed: bool
    samples: int
    outputs: tuple[OutputCheck, ...]
    noise_floor: Mapping[str, Any] | str = "off"  # {"method": "float64", "margin": 4.0} or "off"
    rule: str = ""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorCheck:
        """From the dict ``report.extra`` holds (``bnfold.torch.export.compare_arrays``)."""
        return cls(max_abs=float(d["max_abs"]), max_rel=float(d["max_rel"]), passed=bool(d["passed"]),
                   samples=int(d["samples"]), outputs=tuple(OutputCheck(**o) for o in d.get("outputs", [])),
                   noise_floor=d.get("noise_floor", "off"), rule=str(d.get("rule", "")))


@dataclass(frozen=True)
class ConvertResult:
    """What :func:`convert` did.

    ``route``: 'torch', 'onnx', 'onnx-fallback' (fx cannot trace the module) or 'onnx-torchscript'.
    ``torch_check``: folded vs frozen module in eager PyTorch (torch route). ``export_check``: the
    written file vs the folded module (torch route), or the ONNX export vs PyTorch eager (ONNX
    routes). ``verification``: the ONNX fold's verification (ONNX routes). Each is None where it
    did not run. ``failed``: 'torch_check', 'export_check' or 'verification' when that check
    failed (the output is then not written), else None. ``plan``: a dry run's rows.
    """

    report: Report
    route: str
    output: Path | None  # written
    frozen_output: Path | None  # written
    torch_check: TensorCheck | None = None
    export_check: TensorCheck | None = None
    failed: str | None = None
    plan: tuple[BnInspection, ...] | None = None

    @property
    def verification(self) -> VerifyResult | None:
        return self.report.verification

    @property
    def warnings(self) -> tuple[str, ...]:
        return tuple(self.report.warnings)

    @property
    def passed(self) -> bool:
        """False iff a check ran and failed."""
        return self.failed is None


def resolve_device(requested: str | None) -> str:
    """The calibration device: ``requested``, else cuda when torch sees a GPU, else cpu."""
    available = torch.cuda.is_available()
    if requested is None:
        return "cuda" if available else "cpu"
    if requested == "cuda" and not available:
        why = "torch was built without CUDA" if torch.version.cuda is None else "torch sees no CUDA device"
        raise ProviderUnavailable(f"device='cuda' was requested but CUDA is not available ({why}, torch "
                                  f"{torch.__version__}); use device='cpu'")
    return requested


# ----------------------------------------------------------------------------- the request


@dataclass(frozen=True)
class _Request:
    output: Path | None
    frozen_output: Path | None
    data: Path | StreamSource | None  # a file, or a streamed source (bnfold.data.stream)
    batch_size: int | None
    estimator: str
    allow_reused_bn: bool
    verify: bool
    verify_samples: int
    dry_run: bool
    config: VerifyConfig | None
    progress: Callable[[int, int | None], None] | None
    warn: Callable[[str], None] | None
    outputs: Outputs
    recalibrate: str = "training"
    training_graph: bool = False
    target_se: float = DEFAULT_TARGET_SE
    inplace: bool = False  # the module may be calibrated and frozen in place (convert's inplace)

    def tolerances(self) -> dict[str, Any]:
        """The config's atol/rtol for the torch and export checks (the dtype defaults where not given)."""
        return {} if self.config is None else {"atol": self.config.atol, "rtol": self.config.rtol}

    def oracle(self, module: nn.Module, example: Example) -> dict[str, Any] | None:
        """The float64 run of ``module`` that gives the checks their noise floor; None when the
        config turns the floor off (``noise_floor=False``) or the module cannot run in float64."""
        if self.config is not None and not self.config.noise_floor:
            return None
        return ex.float64_oracle(module, example)


def _progress(req: _Request) -> Callable[[int, int | None], None] | None:
    """The progress callback (total None: a streamed source's count is not known)."""
    return req.progress


def _data_arg(data: Any) -> Path | StreamSource | None:
    """A data file's path, or a streamed source (any iterable of batches: ``bnfold.data.stream``)."""
    if data is None:
        return None
    return StreamSource(data) if is_stream_source(data) else Path(data)


def _as_loaded(module: nn.Module | LoadedTorchModel) -> LoadedTorchModel:
    if isinstance(module, LoadedTorchModel):
        return module
    if not isinstance(module, nn.Module):
        raise BadInputError(f"module must be a torch.nn.Module, not {type(module).__name__}")
    module, unwrapped = unwrap(module)  # torch.compile / DataParallel / AveragedModel: convert the model inside
    inputs, var_kw = forward_inputs(module)
    kind = TORCHSCRIPT if isinstance(module, torch.jit.ScriptModule) else MODULE
    return LoadedTorchModel(module=module, kind=kind, label=f"module {type(module).__name__}", path=None,
                            sha256=None, inputs=inputs, var_keyword=var_kw, warnings=unwrapped)


def convert(
    module: nn.Module | LoadedTorchModel,
    data: str | os.PathLike[str] | None = None,
    output: str | os.PathLike[str] | None = None,
    *,
    frozen_output: str | os.PathLike[str] | None = None,
    batch_size: int | None = None,
    estimator: str = "unbiased",
    device: str | None = None,
    allow_reused_bn: bool = False,
    verify: bool = True,
    verify_samples: int = 4,
    config: VerifyConfig | None = None,
    dry_run: bool = False,
    progress: Callable[[int, int | None], None] | None = None,
    warn: Callable[[str], None] | None = None,
    outputs: Outputs | None = None,
    recalibrate: str = "training",
    training_graph: bool = False,
    target_se: float = DEFAULT_TARGET_SE,
    inplace: bool = False,
) -> ConvertResult:
    """Calibrate, fold, check and write a PyTorch model.

    ``module``: an ``nn.Module`` (its BNs may be in training mode; it is not changed) or a model
    from :func:`bnfold.torch.load_model_file` / :func:`bnfold.torch.load_factory`. ``data``: the
    calibration data, a ``.npz`` keyed by forward's parameter names, a ``.npy`` for one input, or a
    folder of them; its first samples are also the example inputs of the export and the checks.
    ``output``: the folded model; its suffix picks the format (see
    :data:`bnfold.output_formats.TORCH_OUTPUT_FORMATS`). Required unless ``dry_run``, where it
    only picks the route and nothing is written. ``frozen_output``: also write the frozen,
    unfolded model in the same format. ``device``: where to calibrate (default: cuda when torch
    sees a GPU). ``config``: the tolerances (``atol``/``rtol``) of the checks and the ONNX
    verification's settings. ``warn`` is called with a warning as it happens (they are also in
    ``report.warnings``); ``progress(done, total)`` once per calibration batch. ``outputs``: an
    :class:`bnfold.outputs.Outputs` the files are staged in, left for the caller to commit with its
    own (reports); by default ``convert`` commits them. The frozen output is written when the run
    ends with a verdict (also a failed check), the model only when every check passed; nothing on
    an error. ``recalibrate``: which BNs ``data`` re-estimates, ``'training'`` (default: those in
    ``train()`` or with ``track_running_stats=False``; eval-mode BNs keep their running statistics)
    or ``'all'`` (every BN, each one's drift from its running statistics on its report record);
    the same on both routes. ``training_graph``: calibrate on the module's training-time forward
    with Dropout and stochastic depth off (see :func:`bnfold.torch.fold`). ``target_se``: the
    standard error the statistics should reach (see :func:`bnfold.fold`). ``inplace=True``: the
    module may be changed, as a copy would be: where it is calibrated in PyTorch it is calibrated
    and frozen in place (it ends as the frozen, unfolded model; a TorchScript module ends in eval
    mode), which saves a copy of its weights, in time and memory. For a model nothing else will
    use, such as one :func:`bnfold.torch.load_model_file` has just read (the ``bnfold`` command does this).
    """
    with contextlib.ExitStack() as stack:
        tx = outputs if outputs is not None else stack.enter_context(Outputs())
        result = _convert(module, data, output, frozen_output, batch_size, estimator, device, allow_reused_bn,
                          verify, verify_samples, config, dry_run, progress, warn, tx, recalibrate,
                          training_graph, target_se, inplace)
        if outputs is None:
            tx.commit()
    return result


def _convert(module: nn.Module | LoadedTorchModel, data: str | os.PathLike[str] | None,
             output: str | os.PathLike[str] | None, frozen_output: str | os.PathLike[str] | None,
             batch_size: int | None, estimator: str, device: str | None, allow_reused_bn: bool, verify: bool,
             verify_samples: int, config: VerifyConfig | None, dry_run: bool,
             progress: Callable[[int, int | None], None] | None, warn: Callable[[str], None] | None,
             outputs: Outputs, recalibrate: str = "training", training_graph: bool = False,
             target_se: float = DEFAULT_TARGET_SE, inplace: bool = False) -> ConvertResult:
    check_path(output, "output")
    check_path(frozen_output, "frozen_output")
    check_count(batch_size, "batch_size", optional=True, label="batch size")
    check_count(verify_samples, "verify_samples")
    check_callable(progress, "progress")
    check_config(config, "config")
    check_recalibrate(recalibrate)
    target_se = check_target_se(target_se)
    if training_graph and data is None:
        raise BadInputError("training_graph=True calibrates on the training-time forward; pass calibration data "
                            "(the data argument)")
    if recalibrate == "all" and data is None:
        raise BadInputError("recalibrate='all' re-estimates every BN on data; pass calibration data (the data "
                            "argument)")
    dev = resolve_device(device)
    out_path = Path(output) if output is not None else None
    fmt = torch_output_format(out_path) if out_path is not None else None
    if out_path is not None and fmt is None:
        raise BadInputError(f"output {out_path}: the suffix must be .onnx, .pt2, .pt, .ts or .torchscript "
                            "(it picks the format)")
    if out_path is None and not dry_run:
        raise BadInputError("output is needed unless dry_run=True")
    if not dry_run:
        check_output_paths(output=output, frozen_output=frozen_output)
    req = _Request(output=out_path, frozen_output=None if dry_run or frozen_output is None else Path(frozen_output),
                   data=_data_arg(data), batch_size=batch_size, estimator=estimator,
                   allow_reused_bn=allow_reused_bn, verify=verify, verify_samples=verify_samples, dry_run=dry_run,
                   config=config, progress=progress, warn=warn, outputs=outputs, recalibrate=recalibrate,
                   training_graph=training_graph, target_se=target_se, inplace=inplace)
    loaded = _as_loaded(module)
    outputs.protect("the input model", loaded.path)
    notes: list[str] = list(loaded.warnings)

    cal: CalibrationData | StreamData | None = None
    example: Example | None = None
    dtype = float_dtype(loaded.module)
    if isinstance(req.data, StreamSource):
        cal = StreamData(req.data, stream_input_specs(loaded, req.data), req.batch_size,
                         keep=max(2, req.verify_samples))
    elif req.data is not None:
        specs = input_specs(loaded, req.data)
        cal = open_data(req.data, specs, req.batch_size)
    if cal is not None:
        k = max(2, req.verify_samples)
        example = ordered(loaded, tensors(cal.take(k), dtype))
    elif loaded.example_inputs is not None:
        example = ordered(loaded, {n: t.to(dtype) if t.is_floating_point() else t
                                   for n, t in loaded.example_inputs.items()})

    if loaded.scripted:
        route, reason = "onnx-torchscript", None
    else:
        err = _traceable(loaded.module, loaded, example)
        route, reason = ("torch", None) if err is None else ("onnx-fallback", _trace_reason(err))
    name = type(loaded.module).__name__ if not loaded.scripted else getattr(loaded.module, "original_name", "module")
    if route != "torch" and fmt not in ("onnx", None):
        if route == "onnx-torchscript":
            raise UnsupportedModelError(
                f"a TorchScript module cannot be fx-traced, so bnfold cannot fold it in PyTorch and write "
                f"{FORMAT_LABELS[fmt]}; use an .onnx output (bnfold then folds it through an ONNX export)")
        raise UnsupportedModelError(
            f"torch.fx cannot trace {name} ({reason}), so bnfold cannot fold it in PyTorch and write "
            f"{FORMAT_LABELS[fmt]}; use an .onnx output (bnfold then folds it through an ONNX export)")
    if fmt in ("pt2", "torchscript") and example is not None:
        by_kwargs = sorted(set(example) - {i.name for i in loaded.inputs})
        if by_kwargs:
            raise UnsupportedModelError(
                f"forward takes {', '.join(repr(k) for k in by_kwargs)} through **kwargs, which "
                f"{FORMAT_LABELS[fmt]} cannot carry as a named input; use an .onnx output, or give forward "
                "a parameter of that name")
    torch_route = route == "torch" and (fmt in ("pt2", "torchscript") or (fmt is None and req.dry_run))
    if example is None and not (torch_route and req.dry_run):
        _need_example(example, "the export and the checks")
    if torch_route:
        return _run_torch(req, loaded, cal, example, dev, fmt, notes)
    if route == "onnx-torchscript":
        notes.append("TorchScript modules cannot be fx-traced: bnfold folded it through an ONNX export "
                     "(torch.onnx.export "
                     "of the TorchScript module in eval mode; its BNs calibrated on data and folded by the ONNX "
                     "pipeline)")
    elif route == "onnx-fallback":
        msg = (f"torch.fx cannot trace {name} ({reason}); bnfold folded it through an ONNX export of the "
               "calibrated, frozen module instead")
        notes.append(msg)
        if req.warn is not None:
            req.warn(msg)
    return _run_onnx(req, loaded, cal, example, dev, "onnx" if route == "torch" else route, notes)


# ----------------------------------------------------------------------------- helpers


def _traceable(module: nn.Module, loaded: LoadedTorchModel, example: Example | None) -> UnsupportedModelError | None:
    """None when fx can trace the module (as the eval-mode module the fold traces) into a module
    that computes the same on the example, else the error."""
    flags = {m: m.training for m in module.modules()}
    batch = None
    if example is not None:
        args, kwargs, _ = split(loaded, example)
        dev = module_device(module)
        batch = Batch(args=tuple(a.to(dev) for a in args), kwargs={k: v.to(dev) for k, v in kwargs.items()})
    try:
        module.eval()
        trace(module, batch)
    except UnsupportedModelError as exc:
        return exc
    finally:
        for m, flag in flags.items():
            m.training = flag
    return None


def _trace_reason(exc: UnsupportedModelError) -> str:
    cause = exc.__cause__
    return f"{type(cause).__name__}: {one_line(cause, 160)}" if cause is not None else one_line(exc, 160)


def _forward_failed(exc: Exception, what: str) -> BadInputError:
    return BadInputError(f"the model's forward failed on {what} ({type(exc).__name__}: {one_line(exc, 200)}); "
                         "check that the data matches the model's inputs")


def _need_example(example: Example | None, what: str) -> Example:
    if example is None:
        raise BadInputError(f"data is needed for a PyTorch model: bnfold takes the example inputs for {what} "
                            "from it (an .npz keyed by forward's parameter names, or a .npy for one input)")
    return example


def _rows(report: Report) -> tuple[BnInspection, ...]:
    return tuple(BnInspection(b.name, b.mode_before, b.target if b.action is Action.FOLDED else None, None, b.channels,
                              FoldDecision(bn=b.name, action=b.action, target=b.target, direction=b.direction,
                                           reason=b.reason, detail=b.detail)) for b in report.bns)


def _source_extra(loaded: LoadedTorchModel, device: str, route: str) -> dict[str, Any]:
    src: dict[str, Any] = {"kind": loaded.kind, "path": str(loaded.path) if loaded.path else None}
    if loaded.kind == FACTORY:
        src["factory"] = loaded.factory
    return {"frontend": "torch", "torch_version": torch.__version__, "source": src, "device": device,
            "route": route}


def _fill_input(report: Report, loaded: LoadedTorchModel) -> None:
    report.input_path = loaded.label
    report.input_sha256 = loaded.sha256


def _save(fmt: str, module: nn.Module, loaded: LoadedTorchModel, example: Example, path: Path,
          target: Path) -> list[str]:
    """Write ``module`` in format ``fmt`` to ``path`` (staged for ``target``, which errors name)."""
    try:
        return _write(fmt, module, loaded, example, path)
    except OSError as exc:
        raise BadInputError(f"cannot write {target}: {exc.strerror or type(exc).__name__}") from exc


def _write(fmt: str, module: nn.Module, loaded: LoadedTorchModel, example: Example, path: Path) -> list[str]:
    args, kwargs, names = split(loaded, example)
    if fmt == "pt2":
        return ex.save_exported_program(module, args, kwargs, names, path, dynamic_batch=True)
    if fmt == "torchscript":
        return ex.save_torchscript(module, args, kwargs, names, path)
    info = ex.export_onnx(module, example, path, dynamic_batch=True, positional=names)
    return info.warnings


def _placeholder_frozen(module: nn.Module) -> tuple[nn.Module, dict[str, Mode]]:
    """A copy with every BN in inference mode (placeholder statistics where it had none), for a plan."""
    work = copy_module(module)
    modes = {}
    for name, m in find_batchnorms(work):
        modes[name] = bn_mode(m)
        if is_standard_bn(m) and (m.running_mean is None or m.running_var is None or not m.track_running_stats):
            w = m.weight if m.affine and m.weight is not None else None
            kw: dict[str, Any] = {"dtype": w.dtype, "device": w.device} if w is not None else {}
            m.register_buffer("running_mean", torch.zeros(m.num_features, **kw))
            m.register_buffer("running_var", torch.ones(m.num_features, **kw))
            m.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
            m.track_running_stats = True
    work.eval()
    return work, modes


# ----------------------------------------------------------------------------- the torch route


def _run_torch(req: _Request, loaded: LoadedTorchModel, cal: CalibrationData | StreamData | None,
               example: Example | None, device: str, fmt: str | None, notes: list[str]) -> ConvertResult:
    placeholder_modes: dict[str, Mode] | None = None
    if cal is None and req.dry_run:
        work, placeholder_modes = _placeholder_frozen(loaded.module)
    else:
        work = loaded.module if req.inplace else copy_module(loaded.module)
    try:
        result = torch_fold(work, data=cal, device=device, estimator=req.estimator,
                            allow_reused_bn=req.allow_reused_bn, inplace=True,
                            example_inputs=example if cal is None else None, progress=_progress(req),
                            recalibrate=req.recalibrate, training_graph=req.training_graph,
                            target_se=req.target_se)
    except BnfoldError:
        raise
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        raise _forward_failed(exc, "the calibration data") from exc
    frozen = work  # calibrated in place: the frozen, unfolded model
    report = result.report
    _fill_input(report, loaded)
    report.dry_run = req.dry_run
    report.warnings = notes + report.warnings
    report.extra.update(_source_extra(loaded, device, "torch"))
    if placeholder_modes is not None:
        report.calibrated = False
        for b in report.bns:
            b.mode_before = placeholder_modes.get(b.name, b.mode_before)
            b.stats = None
    if req.dry_run:
        return ConvertResult(report=report, route="torch", output=None, frozen_output=None, plan=_rows(report))
    assert fmt is not None and req.output is not None
    example = ordered(loaded, _need_example(example, f"{FORMAT_LABELS[fmt]} export and the checks"))

    # the frozen model is staged too and registered at once: it is moved into place when the run
    # ends with a verdict (passed, or a check that failed), never after an error (no commit then)
    if req.frozen_output is not None:
        frozen_cpu = copy_module(frozen).to("cpu").eval()
        frozen_tmp = req.outputs.path_for(req.frozen_output)
        notes_f = _save(fmt, frozen_cpu, loaded, example, frozen_tmp, req.frozen_output)
        req.outputs.add(req.frozen_output, frozen_tmp)
        report.warnings.extend(n for n in notes_f if n not in report.warnings)
        del frozen_cpu
    out = _check_and_save(req, loaded, result, frozen, example, fmt, report)
    if req.frozen_output is not None:
        out = replace(out, frozen_output=req.frozen_output)
    return out


def _check_and_save(req: _Request, loaded: LoadedTorchModel, result: TorchFoldResult, frozen: nn.Module,
                    example: Example, fmt: str, report: Report) -> ConvertResult:
    """The torch check (folded vs frozen, eager), then the written file and the export check."""
    assert req.output is not None
    dev = module_device(frozen)
    torch_check: TensorCheck | None = None
    if req.verify:
        try:
            ref = ex.eager_named(frozen, to_device(example, dev))
            got = ex.eager_named(result.module, to_device(example, dev))
        except (RuntimeError, TypeError, ValueError, IndexError) as exc:
            raise _forward_failed(exc, "the data samples") from exc
        check = ex.compare_arrays(ref, got, sample_count(example), **req.tolerances(),
                                  oracle=req.oracle(frozen, to_device(example, dev)))
        report.extra["torch_check"] = check
        torch_check = TensorCheck.from_dict(check)
        if not torch_check.passed:
            return ConvertResult(report=report, route="torch", output=None, frozen_output=None,
                                 torch_check=torch_check, failed="torch_check")

    folded = result.module.to("cpu").eval()
    tmp = req.outputs.path_for(req.output)
    export_check: TensorCheck | None = None
    report.warnings.extend(_save(fmt, folded, loaded, example, tmp, req.output))
    if req.verify:
        try:
            reloaded = ex.load_saved(tmp, fmt)
            ref = ex.eager_named(folded, example)
            args, kwargs, _ = split(loaded, example)  # called like the original: positionally
            with torch.no_grad():
                written = ex.flat_outputs(reloaded(*args, **kwargs))
        except BnfoldError:
            raise
        except Exception as exc:
            raise UnsupportedModelError(f"the {FORMAT_LABELS[fmt]} written for the folded module does not "
                                        f"load or run: {type(exc).__name__}: {one_line(exc, 240)}") from exc
        got_arrays = ex.tensors_to_arrays(list(ref), written)
        check = ex.compare_arrays(ref, got_arrays, sample_count(example), **req.tolerances(),
                                  oracle=req.oracle(folded, example))
        report.extra["export_check"] = check
        export_check = TensorCheck.from_dict(check)
        if not export_check.passed:
            return ConvertResult(report=report, route="torch", output=None, frozen_output=None,
                                 torch_check=torch_check, export_check=export_check, failed="export_check")
    req.outputs.add(req.output, tmp)
    report.output_path = str(req.output)
    report.output_sha256 = sha256_of(tmp)
    return ConvertResult(report=report, route="torch", output=req.output, frozen_output=None,
                         torch_check=torch_check, export_check=export_check)


# ----------------------------------------------------------------------------- the ONNX routes


def _scripted_training_bns(module: nn.Module) -> list[str]:
    """Names of the BatchNorm submodules of a TorchScript module that are in training mode."""
    return [name or "(root)" for name, sub in module.named_modules()
            if "BatchNorm" in str(getattr(sub, "original_name", "")) and sub.training]


@dataclass(frozen=True)
class _Frozen:
    """The module to export (inference BNs, on the cpu) and how it was frozen."""

    module: nn.Module
    reused: bool = False  # a BN is applied at several places
    run: CalibrationRun | None = None  # the PyTorch calibration (None: not calibrated in PyTorch)
    modes: Mapping[str, Mode] | None = None  # each BN module's mode before calibration
    onnx_recalibrate: str = "training"  # what the ONNX pipeline re-estimates on the export
    keep_drift: bool = True  # whether the ONNX pipeline's drift records mean what they say
    all_training: bool = False  # a TorchScript module whose BNs were all in training mode


def _scripted_recalibrate(req: _Request, module: nn.Module, live: list[str]) -> str:
    """What the ONNX pipeline re-estimates for a TorchScript module, which is exported in eval
    mode (its BN modes do not survive the export)."""
    if req.recalibrate == "all" or not live or req.data is None:
        return req.recalibrate if req.data is not None else "training"
    every = [name or "(root)" for name, sub in module.named_modules()
             if "BatchNorm" in str(getattr(sub, "original_name", ""))]
    if len(live) < len(every):
        raise UnsupportedModelError(
            f"the TorchScript module has BNs in training mode ('{live[0]}') and in eval mode; its export cannot "
            "tell them apart, so bnfold cannot recalibrate only the training-mode ones: pass recalibrate='all', or "
            "load the model as a module (not TorchScript)")
    return "all"  # every BN is in training mode: 'all' re-estimates exactly those


def _frozen_module(req: _Request, loaded: LoadedTorchModel, cal: CalibrationData | StreamData | None, device: str,
                   notes: list[str]) -> _Frozen:
    """The module to export (inference BNs, on the cpu), calibrated in PyTorch where it can be."""
    if loaded.scripted:
        module = loaded.module
        if req.training_graph:
            raise BadInputError("training_graph=True needs the model as a module: a TorchScript module's "
                                "training-time graph cannot be run with its Dropout switched off")
        live = _scripted_training_bns(module)
        if live and cal is None:
            raise BadInputError(f"BN '{live[0]}' of the TorchScript module is in training mode (batch statistics); "
                                "pass calibration data (the data argument)")
        onnx_recal = _scripted_recalibrate(req, module, live)
        module.eval()  # exported as inference BNs; the ONNX pipeline recalibrates them on the data
        every = [n for n, sub in module.named_modules() if "BatchNorm" in str(getattr(sub, "original_name", ""))]
        return _Frozen(module, onnx_recalibrate=onnx_recal, keep_drift=req.recalibrate == "all",
                       all_training=bool(live) and len(live) == len(every))
    if cal is not None:
        modes = {n: bn_mode(m) for n, m in find_batchnorms(loaded.module)}
        try:
            run_ = run_calibration(loaded.module, cal, device=device, estimator=req.estimator,
                                   allow_reused_bn=req.allow_reused_bn, progress=_progress(req),
                                   recalibrate=req.recalibrate, training_graph=req.training_graph,
                                   target_se=req.target_se, inplace=req.inplace)
        except BnfoldError:
            raise
        except (RuntimeError, TypeError, ValueError, IndexError) as exc:
            raise _forward_failed(exc, "the calibration data") from exc
        notes.extend(run_.warnings)  # the ONNX pipeline does not calibrate the export again
        return _Frozen(run_.module.to("cpu").eval(), bool(run_.reused), run_ if run_.stats else None, modes)
    live = [n for n, m in find_batchnorms(loaded.module) if bn_mode(m) is Mode.TRAINING]
    if live:
        raise BadInputError(f"BN '{live[0]}' normalises with batch statistics (training mode or "
                            "track_running_stats=False); pass calibration data (the data argument)")
    return _Frozen((loaded.module if req.inplace else copy_module(loaded.module)).eval().to("cpu").eval())


def _attach_torch_stats(report: Report, onnx_path: Path, frozen: _Frozen) -> None:
    """Put the PyTorch calibration's statistics, drift and modes on the ONNX fold's BN records.

    The export names BN nodes after its own scopes, so each module is found by its statistics:
    the node whose stored mean is, byte for byte, the module's calibrated mean in the export's
    dtype (a calibrated mean is data-dependent, so two modules do not share one). A module with
    no unique match leaves its record as the ONNX fold made it."""
    run = frozen.run
    if run is None:
        return
    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL}
    by_mean: dict[bytes, list[str]] = {}
    for node in model.graph.node:
        if node.op_type == "BatchNormalization" and len(node.input) >= 5 and node.input[3] in inits:
            arr = numpy_helper.to_array(inits[node.input[3]])
            by_mean.setdefault(arr.dtype.str.encode() + arr.tobytes(), []).append(node.name)
    records = {b.name: b for b in report.bns}
    for name, st in run.stats.items():
        for dtype in ("<f4", "<f8", "<f2"):
            hits = by_mean.get(dtype.encode() + st.mean.astype(dtype).tobytes(), [])
            if len(hits) == 1 and hits[0] in records:
                rec = records[hits[0]]
                rec.stats, rec.drift = st, run.drift.get(name)
                if frozen.modes is not None and name in frozen.modes:
                    rec.mode_before = frozen.modes[name]
                break
    report.calibrated = True


def _run_onnx(req: _Request, loaded: LoadedTorchModel, cal: CalibrationData | StreamData | None,
              example: Example | None, device: str, route: str, notes: list[str]) -> ConvertResult:
    """The ONNX routes. A TorchScript module is exported in eval mode, its own (it cannot be
    copied as a module can): its modules' training flags are put back afterwards, unless
    ``req.inplace`` (the module passed to convert is not changed)."""
    flags = {m: m.training for m in loaded.module.modules()} if loaded.scripted and not req.inplace else {}
    try:
        return _export_and_fold(req, loaded, cal, example, device, route, notes)
    finally:
        for m, flag in flags.items():
            m.training = flag


def _export_and_fold(req: _Request, loaded: LoadedTorchModel, cal: CalibrationData | StreamData | None,
                     example: Example | None, device: str, route: str, notes: list[str]) -> ConvertResult:
    example = _need_example(example, "the ONNX export")
    if isinstance(cal, StreamData) and not cal.reiterable:
        raise BadInputError("the data is a one-shot iterator (e.g. a generator), but an ONNX output reads it twice "
                            "(calibration in PyTorch, then on the export); pass a list or a DataLoader, or write a "
                            ".pt2/.pt output")
    frozen = _frozen_module(req, loaded, cal, device, notes)
    module, reused, calibrated_in_torch = frozen.module, frozen.reused, frozen.run is not None
    example = ordered(loaded, example)

    # beside the output (swept by a later run if this one is killed), else a private temporary folder
    tmpdir = req.outputs.scratch(None if req.dry_run else req.output)
    try:
        onnx_path = tmpdir / "frozen.onnx"
        info = ex.export_onnx(module, example, onnx_path, dynamic_batch=True, positional=split(loaded, example)[2])
        notes.extend(info.warnings)
        check: dict[str, Any] | None = None
        if req.verify:
            try:
                ref = ex.run_eager_any(module, example)
            except (RuntimeError, TypeError, ValueError, IndexError) as exc:
                raise _forward_failed(exc, "the data samples") from exc
            out_names, values = ex.run_onnx(onnx_path, {k: v.numpy() for k, v in example.items()})
            reference = ex.tensors_to_arrays(info.output_names, ref)
            check = ex.compare_arrays(reference, dict(zip(out_names, values)), sample_count(example),
                                      **req.tolerances(), oracle=req.oracle(module, example))
        frozen_written: Path | None = None
        rows: tuple[BnInspection, ...] | None
        if check is not None and not check["passed"]:
            inspected = onnx_inspect(onnx_path)
            rows = tuple(inspected) if req.dry_run else None
            report = Report(input_path=None, output_path=None, input_sha256=None, output_sha256=None,
                            estimator=req.estimator, batch_size=req.batch_size, calibrated=False,
                            bns=[BnRecord(name=r.name, mode_before=r.mode, action=r.decision.action,
                                          target=r.decision.target, direction=r.decision.direction,
                                          reason=r.decision.reason, detail=r.decision.detail, channels=r.channels)
                                 for r in inspected],
                            warnings=[*notes, ("the export check failed, so nothing was folded: the BN "
                                               "list is fold's plan for the exported model")],
                            dry_run=req.dry_run)
        else:
            if reused:
                notes.append("a BN is applied at several places (allow_reused_bn=True): the ONNX pipeline keeps the "
                             "pooled statistics from PyTorch instead of recalibrating, and verifies on random inputs")
            use_data = req.data if (req.data is not None and not reused) else None
            if isinstance(use_data, StreamSource):  # read again for the export (checked re-iterable above)
                use_data = use_data.source
            result = onnx_fold(
                onnx_path, output=req.output, data=use_data, batch_size=req.batch_size if use_data else None,
                estimator=req.estimator, verify=req.verify, dry_run=req.dry_run,
                verify_samples=req.verify_samples, progress=req.progress, verify_config=req.config,
                frozen_output=req.frozen_output, outputs=req.outputs,
                recalibrate=frozen.onnx_recalibrate if use_data else "training", target_se=req.target_se)
            report = result.report
            report.recalibrate = req.recalibrate
            if not frozen.keep_drift:
                for b in report.bns:
                    b.drift = None
            _attach_torch_stats(report, onnx_path, frozen)
            if frozen.all_training:  # exported in eval mode, its BNs read as inference ones there
                for b in report.bns:
                    b.mode_before = Mode.TRAINING
            report.warnings = notes + report.warnings
            rows = tuple(onnx_inspect(onnx_path)) if req.dry_run else None
            frozen_written = req.frozen_output
        _fill_input(report, loaded)
        report.extra.update(_source_extra(loaded, device, route))
        report.extra["onnx_export"] = {"opset": ex.OPSET, "dynamic_batch": info.dynamic_batch,
                                       "inputs": info.input_names, "outputs": info.output_names,
                                       "calibrated_in_torch": calibrated_in_torch}
        export_check: TensorCheck | None = None
        if check is not None:
            report.extra["export_check"] = check
            export_check = TensorCheck.from_dict(check)
            if not export_check.passed:
                return ConvertResult(report=report, route=route, output=None, frozen_output=None,
                                     export_check=export_check, failed="export_check", plan=rows)
        v = report.verification
        failed = None if v is None or v.passed else "verification"
        written = Path(report.output_path) if report.output_path else None
        return ConvertResult(report=report, route=route, output=written, frozen_output=frozen_written,
                             export_check=export_check, failed=failed, plan=rows)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
