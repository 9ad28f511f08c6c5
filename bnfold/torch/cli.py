"""What ``bnfold fold`` does with a PyTorch model: the glue between ``cli/main.py`` and the library.

:func:`run` takes a :class:`TorchFoldRequest` (the parsed options) and returns a
:class:`TorchFoldOutcome` (the report, the verdict, extra summary lines, the dry-run plan). The
command itself only validates options, prints, writes the report files and maps the outcome to
an exit code. The routes:

* **torch** (the module can be fx-traced, OUTPUT ``.pt2`` / ``.pt`` / ``.ts`` / ``.torchscript``):
  :func:`bnfold.torch.fold` calibrates and folds in PyTorch; the folded module is compared with
  the frozen one in eager mode (``extra["torch_check"]``), written with ``torch.export`` or
  ``torch.jit.trace``, read back and compared with the folded module (``extra["export_check"]``).
* **onnx** (OUTPUT ``.onnx``): the module is calibrated and frozen in PyTorch
  (:func:`bnfold.torch.calibrate`), exported to ONNX, the export compared with PyTorch eager on
  onnxruntime (``extra["export_check"]``), and the export folded and verified by
  :func:`bnfold.api.fold` exactly like an ONNX input. This is also the route for modules fx
  cannot trace (with a warning) and for TorchScript archives (exported as they are, training-mode
  BNs included, and calibrated by the ONNX pipeline).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bnfold.data.sources import CalibrationData, InputSpec, open_data
from bnfold.errors import BadInputError, BnfoldError, ProviderUnavailable, UnsupportedModelError, one_line
from bnfold.records import Action, BnRecord, FoldDecision, Mode, Report
from bnfold.torch import export as ex
from bnfold.torch.batches import Batch
from bnfold.torch.calibrate import (
    bn_mode,
    copy_module,
    find_batchnorms,
    float_dtype,
    is_standard_bn,
    module_device,
    run_calibration,
)
from bnfold.torch.fold import fold as torch_fold
from bnfold.torch.fold import trace
from bnfold.torch.load import FACTORY, KIND_LABELS, LoadedTorchModel, load_factory, load_model_file, sha256_of

__all__ = ["OUTPUT_FORMATS", "TorchFoldOutcome", "TorchFoldRequest", "output_format", "resolve_device", "run"]

#: OUTPUT suffix -> format written
OUTPUT_FORMATS = {".onnx": "onnx", ".pt2": "pt2", ".pt": "torchscript", ".ts": "torchscript",
                  ".torchscript": "torchscript"}

_FORMAT_LABEL = {"onnx": "ONNX", "pt2": "ExportedProgram", "torchscript": "TorchScript"}


def output_format(path: Path) -> str | None:
    """``'onnx'``, ``'pt2'``, ``'torchscript'`` from the suffix, None for any other suffix."""
    return OUTPUT_FORMATS.get(path.suffix.lower())


def resolve_device(requested: str | None) -> str:
    """The calibration device: ``requested``, else cuda when torch sees a GPU, else cpu."""
    available = torch.cuda.is_available()
    if requested is None:
        return "cuda" if available else "cpu"
    if requested == "cuda" and not available:
        why = "torch was built without CUDA" if torch.version.cuda is None else "torch sees no CUDA device"
        raise ProviderUnavailable(f"--device cuda was requested but CUDA is not available ({why}, torch "
                                  f"{torch.__version__}); use --device cpu")
    return requested


@dataclass
class TorchFoldRequest:
    model: Path | None = None
    factory: str | None = None
    weights: Path | None = None
    unsafe_pickle: bool = False
    output: Path | None = None
    frozen_output: Path | None = None
    data: Path | None = None
    batch_size: int | None = None
    estimator: str = "unbiased"
    device: str | None = None
    allow_reused_bn: bool = False
    verify: bool = True
    verify_samples: int = 4
    dry_run: bool = False
    verify_config: Any = None
    progress: Callable[[int, int], None] | None = None
    warn: Callable[[str], None] | None = None  # prints a warning on stderr as it happens


@dataclass
class TorchFoldOutcome:
    report: Report
    ok: bool = True
    failure: str | None = None  # the exit-1 message when not ok
    lines: list[str] = field(default_factory=list)  # printed before the summary
    plan_rows: list[Any] | None = None  # dry run: BnInspection-like rows
    route: str = "torch"


def _one_line(exc: BaseException, limit: int = 240) -> str:
    return one_line(exc, limit)


# ----------------------------------------------------------------------------- data


def _data_members(path: Path) -> list[tuple[str | None, np.dtype]]:
    """(array name or None for a .npy, dtype) of the first data file under ``path``."""
    from bnfold.data import sources

    if path.is_dir():
        files = sorted(n for n in os.listdir(path) if not n.startswith(".")
                       and os.path.splitext(n)[1].lower() in (".npz", ".npy") and (path / n).is_file())
        if not files:
            return []
        first = path / files[0]
    else:
        first = path
    label = f"'{first}'"
    suffix = first.suffix.lower()
    if suffix == ".npy":
        m = sources._scan_npy(str(first), label, "input")
        return [(None, m.dtype)]
    if suffix == ".npz":
        return [(m.key, m.dtype) for m in sources._scan_npz(str(first), label)]
    return []


def _spec_dtype(dtype: np.dtype | None) -> np.dtype:
    if dtype is None or dtype.kind == "f":
        return np.dtype(np.float32)
    return np.dtype(dtype)


def input_specs(loaded: LoadedTorchModel, data: Path) -> list[InputSpec]:
    """InputSpecs named after forward's parameters (shapes from the data, float32 unless the data
    says otherwise): a .npy feeds the one required input; an .npz feeds every required input and
    the optional ones it names (other names too where forward takes ``**kwargs``)."""
    members = _data_members(data)
    if members and members[0][0] is None:  # .npy: one array
        required = [i.name for i in loaded.inputs if i.required]
        if len(required) > 1:  # let open_data say that a .npy cannot feed them
            return [InputSpec(n, np.float32, None) for n in required]
        name = required[0] if required else (loaded.inputs[0].name if loaded.inputs else "input")
        return [InputSpec(name, _spec_dtype(members[0][1]), None)]
    keys = {k: d for k, d in members}
    specs = [InputSpec(i.name, _spec_dtype(keys.get(i.name)), None)
             for i in loaded.inputs if i.required or i.name in keys]
    if loaded.var_keyword:
        known = {s.name for s in specs}
        specs += [InputSpec(k, _spec_dtype(d), None) for k, d in keys.items() if k not in known]
    if not specs:
        raise BadInputError(f"cannot tell the inputs of the model's forward ({KIND_LABELS[loaded.kind]}); "
                            "give an .npz keyed by forward's parameter names")
    return specs


def _tensors(arrays: Mapping[str, np.ndarray], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {}
    for name, arr in arrays.items():
        t = torch.from_numpy(np.ascontiguousarray(arr))
        out[name] = t.to(dtype) if t.is_floating_point() else t
    return out


def _ordered(loaded: LoadedTorchModel, example: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The example in forward's parameter order (export names the inputs in that order)."""
    order = [i.name for i in loaded.inputs if i.name in example]
    return {**{n: example[n] for n in order}, **{n: t for n, t in example.items() if n not in order}}


def _split(loaded: LoadedTorchModel, example: Mapping[str, torch.Tensor]) -> tuple[
        tuple[torch.Tensor, ...], dict[str, torch.Tensor], list[str]]:
    """Positional args (the leading forward parameters the example gives, in order), the rest as
    keyword args, and the names of the positional ones: a written model is called like the original."""
    names: list[str] = []
    for i in loaded.inputs:
        if i.name not in example or i.keyword_only:
            break
        names.append(i.name)
    args = tuple(example[n] for n in names)
    kwargs = {n: t for n, t in example.items() if n not in names}
    return args, kwargs, names


def _to(example: Mapping[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in example.items()}


# ----------------------------------------------------------------------------- helpers


def _traceable(module: nn.Module, loaded: LoadedTorchModel,
               example: dict[str, torch.Tensor] | None) -> UnsupportedModelError | None:
    """None when fx can trace the module (as the eval-mode module the fold traces) into a module
    that computes the same on the example, else the error."""
    flags = {m: m.training for m in module.modules()}
    batch = None
    if example is not None:
        args, kwargs, _ = _split(loaded, example)
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
    text = f"{type(cause).__name__}: {_one_line(cause, 160)}" if cause is not None else _one_line(exc, 160)
    return text


def _cli_words(exc: BadInputError) -> BadInputError:
    """The library's advice in CLI words (``allow_reused_bn=True`` -> ``--allow-reused-bn``)."""
    text = str(exc)
    if "allow_reused_bn=True" not in text:
        return exc
    return BadInputError(text.replace("allow_reused_bn=True", "--allow-reused-bn"))


def _forward_failed(exc: Exception, what: str) -> BadInputError:
    return BadInputError(f"the model's forward failed on {what} ({type(exc).__name__}: {_one_line(exc, 200)}); "
                         "check that the data matches the model's inputs")


def _samples(example: Mapping[str, torch.Tensor]) -> int:
    for t in example.values():
        if t.dim() >= 1:
            return int(t.shape[0])
    return 1


def _check_line(title: str, check: Mapping[str, Any]) -> str:
    verdict = "passed" if check["passed"] else "FAILED"
    return (f"{title} ({check['samples']} samples): max abs {check['max_abs']:.3g}, "
            f"max rel {check['max_rel']:.3g} -> {verdict}")


def _check_message(check: Mapping[str, Any]) -> str:
    bad = [o["name"] for o in check.get("outputs", []) if not o["passed"]]
    where = f" at output(s) {', '.join(bad)}" if bad else ""
    return f"{where} on {check['samples']} sample(s): max abs diff {check['max_abs']:.3g}, " \
           f"max rel diff {check['max_rel']:.3g}"


def _rows(report: Report) -> list[Any]:
    from bnfold.api import BnInspection

    return [BnInspection(b.name, b.mode_before, b.target if b.action is Action.FOLDED else None, None, b.channels,
                         FoldDecision(bn=b.name, action=b.action, target=b.target, direction=b.direction,
                                      reason=b.reason, detail=b.detail)) for b in report.bns]


def _source_extra(loaded: LoadedTorchModel, req: TorchFoldRequest, device: str, route: str) -> dict[str, Any]:
    src: dict[str, Any] = {"kind": loaded.kind, "path": str(loaded.path) if loaded.path else None}
    if loaded.kind == FACTORY:
        src["factory"] = req.factory
    return {"frontend": "torch", "torch_version": torch.__version__, "source": src, "device": device,
            "route": route}


def _fill_input(report: Report, loaded: LoadedTorchModel) -> None:
    report.input_path = loaded.label
    report.input_sha256 = loaded.sha256


def _staged(output: Path) -> tuple[Path, Path]:
    """A private folder beside ``output`` to write it in, then renamed into place."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".bnfold-", dir=output.parent))
    except OSError as exc:
        raise BadInputError(f"cannot write {output}: {output.parent} is not a folder bnfold can write in "
                            f"({exc.strerror or type(exc).__name__}); give the output a path in a writable folder") from exc
    return stage, stage / output.name


def _save(fmt: str, module: nn.Module, loaded: LoadedTorchModel, example: dict[str, torch.Tensor], path: Path,
          *, dynamic: bool = True) -> list[str]:
    args, kwargs, names = _split(loaded, example)
    if fmt == "pt2":
        return ex.save_exported_program(module, args, kwargs, names, path, dynamic_batch=dynamic)
    if fmt == "torchscript":
        return ex.save_torchscript(module, args, kwargs, names, path)
    info = ex.export_onnx(module, example, path, dynamic_batch=dynamic, positional=names)
    return info.warnings


def _write_final(fmt: str, module: nn.Module, loaded: LoadedTorchModel, example: dict[str, torch.Tensor],
                 path: Path) -> list[str]:
    stage, tmp = _staged(path)
    try:
        notes = _save(fmt, module, loaded, example, tmp)
        os.replace(tmp, path)
        return notes
    finally:
        shutil.rmtree(stage, ignore_errors=True)


# ----------------------------------------------------------------------------- the run


def _tolerances(req: TorchFoldRequest) -> dict[str, Any]:
    """``--atol``/``--rtol`` for the torch and export checks (the dtype defaults where not given)."""
    cfg = req.verify_config
    return {} if cfg is None else {"atol": cfg.atol, "rtol": cfg.rtol}


def _load(req: TorchFoldRequest) -> LoadedTorchModel:
    if req.factory is not None:
        return load_factory(req.factory, req.weights)
    assert req.model is not None
    return load_model_file(req.model, unsafe_pickle=req.unsafe_pickle, warn=req.warn)


def _placeholder_frozen(module: nn.Module) -> tuple[nn.Module, dict[str, Mode]]:
    """A copy with every BN in inference mode (placeholder statistics where it had none), for a plan."""
    work = copy_module(module)
    modes = {}
    for name, m in find_batchnorms(work):
        modes[name] = bn_mode(m)
        if is_standard_bn(m) and (m.running_mean is None or m.running_var is None or not m.track_running_stats):
            w = m.weight if m.affine and m.weight is not None else None
            kw = {"dtype": w.dtype, "device": w.device} if w is not None else {}
            m.register_buffer("running_mean", torch.zeros(m.num_features, **kw))
            m.register_buffer("running_var", torch.ones(m.num_features, **kw))
            m.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
            m.track_running_stats = True
    work.eval()
    return work, modes


def run(req: TorchFoldRequest) -> TorchFoldOutcome:
    """Load, calibrate, fold, check and write a PyTorch model as ``bnfold fold`` does."""
    device = resolve_device(req.device)
    fmt = output_format(req.output) if req.output is not None else None
    loaded = _load(req)
    notes: list[str] = list(loaded.warnings)

    cal: CalibrationData | None = None
    example: dict[str, torch.Tensor] | None = None
    dtype = float_dtype(loaded.module)
    if req.data is not None:
        specs = input_specs(loaded, req.data)
        cal = open_data(req.data, specs, req.batch_size)
        k = max(2, req.verify_samples)
        example = _ordered(loaded, _tensors(cal.take(k), dtype))
    elif loaded.example_inputs is not None:
        example = _ordered(loaded, {n: t.to(dtype) if t.is_floating_point() else t
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
                f"{_FORMAT_LABEL[fmt]}; use an .onnx OUTPUT (bnfold then folds it through an ONNX export)")
        raise UnsupportedModelError(
            f"torch.fx cannot trace {name} ({reason}), so bnfold cannot fold it in PyTorch and write "
            f"{_FORMAT_LABEL[fmt]}; use an .onnx OUTPUT (bnfold then folds it through an ONNX export)")
    if fmt in ("pt2", "torchscript") and example is not None:
        by_kwargs = sorted(set(example) - {i.name for i in loaded.inputs})
        if by_kwargs:
            raise UnsupportedModelError(
                f"forward takes {', '.join(repr(k) for k in by_kwargs)} through **kwargs, which "
                f"{_FORMAT_LABEL[fmt]} cannot carry as a named input; use an .onnx OUTPUT, or give forward "
                "a parameter of that name")
    torch_route = route == "torch" and (fmt in ("pt2", "torchscript") or (fmt is None and req.dry_run))
    if example is None and not (torch_route and req.dry_run):
        _need_example(example, "the export and the checks")
    if torch_route:
        return _run_torch(req, loaded, cal, example, device, fmt, notes)
    if route == "onnx-torchscript":
        notes.append("TorchScript modules cannot be fx-traced: bnfold folded it through an ONNX export (torch.onnx.export "
                     "of the TorchScript module in eval mode; its BNs calibrated on --data and folded by the ONNX "
                     "pipeline)")
    elif route == "onnx-fallback":
        msg = (f"torch.fx cannot trace {name} ({reason}); bnfold folded it through an ONNX export of the "
               "calibrated, frozen module instead")
        notes.append(msg)
        if req.warn is not None:
            req.warn(msg)
    return _run_onnx(req, loaded, cal, example, device, "onnx" if route == "torch" else route, notes)


def _need_example(example: dict[str, torch.Tensor] | None, what: str) -> dict[str, torch.Tensor]:
    if example is None:
        raise BadInputError(f"--data is needed for a PyTorch model: bnfold takes the example inputs for {what} "
                            "from it (an .npz keyed by forward's parameter names, or a .npy for one input)")
    return example


def _run_torch(req: TorchFoldRequest, loaded: LoadedTorchModel, cal: CalibrationData | None,
               example: dict[str, torch.Tensor] | None, device: str, fmt: str | None,
               notes: list[str]) -> TorchFoldOutcome:
    placeholder_modes: dict[str, Mode] | None = None
    if cal is None and req.dry_run:
        work, placeholder_modes = _placeholder_frozen(loaded.module)
    else:
        work = copy_module(loaded.module)
    try:
        result = torch_fold(work, data=cal, device=device, estimator=req.estimator,
                            allow_reused_bn=req.allow_reused_bn, inplace=True,
                            example_inputs=example if cal is None else None, progress=req.progress)
    except BadInputError as exc:
        raise _cli_words(exc) from exc
    except BnfoldError:
        raise
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        raise _forward_failed(exc, "the calibration data") from exc
    frozen = work  # calibrated in place: the frozen, unfolded model
    report = result.report
    _fill_input(report, loaded)
    report.dry_run = req.dry_run
    report.warnings = notes + report.warnings
    report.extra.update(_source_extra(loaded, req, device, "torch"))
    if placeholder_modes is not None:
        report.calibrated = False
        for b in report.bns:
            b.mode_before = placeholder_modes.get(b.name, b.mode_before)
            b.stats = None
    out = TorchFoldOutcome(report=report, route="torch")
    if req.dry_run:
        out.plan_rows = _rows(report)
        return out
    assert fmt is not None and req.output is not None
    example = _need_example(example, f"{_FORMAT_LABEL[fmt]} export and the checks")
    example = _ordered(loaded, example)

    # the frozen model is staged too and moved into place only when the run ends with a verdict
    # (passed, or a check that failed: exit 0 or 1), never after an error (exit 3)
    frozen_stage: Path | None = None
    if req.frozen_output is not None:
        frozen_cpu = copy_module(frozen).to("cpu").eval()
        frozen_stage, frozen_tmp = _staged(req.frozen_output)
        try:
            notes_f = _save(fmt, frozen_cpu, loaded, example, frozen_tmp)
        except BaseException:
            shutil.rmtree(frozen_stage, ignore_errors=True)
            raise
        report.warnings.extend(n for n in notes_f if n not in report.warnings)
        del frozen_cpu
    try:
        out = _check_and_save(req, loaded, result, frozen, example, fmt, report, out)
        if frozen_stage is not None:
            os.replace(frozen_tmp, req.frozen_output)
        return out
    finally:
        if frozen_stage is not None:
            shutil.rmtree(frozen_stage, ignore_errors=True)


def _check_and_save(req: TorchFoldRequest, loaded: LoadedTorchModel, result: Any, frozen: nn.Module,
                    example: dict[str, torch.Tensor], fmt: str, report: Report,
                    out: TorchFoldOutcome) -> TorchFoldOutcome:
    """The torch check (folded vs frozen, eager), then the written file and the export check."""
    assert req.output is not None
    dev = module_device(frozen)
    if req.verify:
        try:
            ref = ex.eager_named(frozen, _to(example, dev))
            got = ex.eager_named(result.module, _to(example, dev))
        except (RuntimeError, TypeError, ValueError, IndexError) as exc:
            raise _forward_failed(exc, "the data samples") from exc
        check = ex.compare_arrays(ref, got, _samples(example), **_tolerances(req))
        report.extra["torch_check"] = check
        out.lines.append(_check_line("Torch check (folded vs frozen, eager float32)", check))
        if not check["passed"]:
            out.ok = False
            out.failure = ("the folded module diverged from the frozen module in eager PyTorch"
                           + _check_message(check) + f"; {req.output} was not written")
            return out

    folded = result.module.to("cpu").eval()
    stage, tmp = _staged(req.output)
    try:
        save_notes = _save(fmt, folded, loaded, example, tmp)
        report.warnings.extend(save_notes)
        if req.verify:
            try:
                reloaded = ex.load_saved(tmp, fmt)
                ref = ex.eager_named(folded, example)
                args, kwargs, _ = _split(loaded, example)  # called like the original: positionally
                with torch.no_grad():
                    got = dict(zip(ref, ex.flat_outputs(reloaded(*args, **kwargs))))
            except BnfoldError:
                raise
            except Exception as exc:  # noqa: BLE001 - the written file does not load or run
                raise UnsupportedModelError(f"the {_FORMAT_LABEL[fmt]} written for the folded module does not "
                                            f"load or run: {type(exc).__name__}: {_one_line(exc)}") from exc
            got_arrays = {k: ex._to_numpy(v) for k, v in got.items()}
            check = ex.compare_arrays(ref, got_arrays, _samples(example), **_tolerances(req))
            report.extra["export_check"] = check
            out.lines.append(_check_line(f"Export check ({_FORMAT_LABEL[fmt]} file vs folded module, eager)", check))
            if not check["passed"]:
                out.ok = False
                out.failure = (f"the {_FORMAT_LABEL[fmt]} export diverged from the folded PyTorch module (an export "
                               f"problem, not a folding one)" + _check_message(check)
                               + f"; {req.output} was not written")
                return out
        os.replace(tmp, req.output)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    report.output_path = str(req.output)
    report.output_sha256 = sha256_of(req.output)
    return out


def _scripted_training_bns(module: torch.jit.ScriptModule) -> list[str]:
    """Names of the BatchNorm submodules of a TorchScript module that are in training mode."""
    return [name or "(root)" for name, sub in module.named_modules()
            if "BatchNorm" in str(getattr(sub, "original_name", "")) and sub.training]


def _run_onnx(req: TorchFoldRequest, loaded: LoadedTorchModel, cal: CalibrationData | None,
              example: dict[str, torch.Tensor] | None, device: str, route: str,
              notes: list[str]) -> TorchFoldOutcome:
    from bnfold import api as pipeline

    example = _need_example(example, "the ONNX export")
    reused = False
    calibrated_in_torch = False
    if loaded.scripted:
        module = loaded.module
        live = _scripted_training_bns(module)
        if live and cal is None:
            raise BadInputError(f"BN '{live[0]}' of the TorchScript module is in training mode (batch statistics); "
                                "pass calibration data with --data")
        module.eval()  # exported as inference BNs; with --data the ONNX pipeline recalibrates every BN
    else:
        if cal is not None:
            try:
                run_ = run_calibration(loaded.module, cal, device=device, estimator=req.estimator,
                                       allow_reused_bn=req.allow_reused_bn, progress=req.progress)
            except BadInputError as exc:
                raise _cli_words(exc) from exc
            except BnfoldError:
                raise
            except (RuntimeError, TypeError, ValueError, IndexError) as exc:
                raise _forward_failed(exc, "the calibration data") from exc
            module = run_.module
            # the ONNX pipeline calibrates the export again (same data, same estimator) and reports the gap
            notes.extend(w for w in run_.warnings if not w.startswith("unbiased (Algorithm 2) and pooled"))
            reused = bool(run_.reused)
            calibrated_in_torch = True
        else:
            module = copy_module(loaded.module).eval()
            live = [n for n, m in find_batchnorms(loaded.module) if bn_mode(m) is Mode.TRAINING]
            if live:
                raise BadInputError(f"BN '{live[0]}' normalises with batch statistics (training mode or "
                                    "track_running_stats=False); pass calibration data with --data")
        module = module.to("cpu").eval()
    example = _ordered(loaded, example)

    tmpdir = Path(tempfile.mkdtemp(prefix="bnfold-torch-"))
    try:
        onnx_path = tmpdir / "frozen.onnx"
        info = ex.export_onnx(module, example, onnx_path, dynamic_batch=True, positional=_split(loaded, example)[2])
        notes.extend(info.warnings)
        check = None
        if req.verify:
            try:
                ref = ex.run_eager_any(module, example)
            except (RuntimeError, TypeError, ValueError, IndexError) as exc:
                raise _forward_failed(exc, "the data samples") from exc
            out_names, values = ex.run_onnx(onnx_path, {k: v.numpy() for k, v in example.items()})
            reference = ex.tensors_to_arrays(info.output_names, ref)
            check = ex.compare_arrays(reference, dict(zip(out_names, values)), _samples(example),
                                      **_tolerances(req))
        if check is not None and not check["passed"]:
            rows = pipeline.inspect(onnx_path)
            report = Report(input_path=None, output_path=None, input_sha256=None, output_sha256=None,
                            estimator=req.estimator, batch_size=req.batch_size, calibrated=False,
                            bns=[BnRecord(name=r.name, mode_before=r.mode, action=r.decision.action,
                                          target=r.decision.target, direction=r.decision.direction,
                                          reason=r.decision.reason, detail=r.decision.detail, channels=r.channels)
                                 for r in rows],
                            warnings=list(notes) + ["the export check failed, so nothing was folded: the BN "
                                                    "list is fold's plan for the exported model"],
                            dry_run=req.dry_run)
        else:
            if reused:
                notes.append("a BN is applied at several places (--allow-reused-bn): the ONNX pipeline keeps the pooled "
                             "statistics from PyTorch instead of recalibrating, and verifies on random inputs")
            use_data = req.data if (req.data is not None and not reused) else None
            result = pipeline.fold(
                onnx_path, output=req.output, data=use_data, batch_size=req.batch_size if use_data else None,
                estimator=req.estimator, verify=req.verify, dry_run=req.dry_run,
                verify_samples=req.verify_samples, progress=req.progress, verify_config=req.verify_config,
                frozen_output=None if req.dry_run else req.frozen_output)
            report = result.report
            report.warnings = notes + report.warnings
            rows = pipeline.inspect(onnx_path) if req.dry_run else None
        _fill_input(report, loaded)
        report.extra.update(_source_extra(loaded, req, device, route))
        report.extra["onnx_export"] = {"opset": ex.OPSET, "dynamic_batch": info.dynamic_batch,
                                       "inputs": info.input_names, "outputs": info.output_names,
                                       "calibrated_in_torch": calibrated_in_torch}
        out = TorchFoldOutcome(report=report, route=route, plan_rows=rows)
        if check is not None:
            report.extra["export_check"] = check
            out.lines.append(_check_line("Export check (PyTorch eager vs ONNX export on onnxruntime)", check))
            if not check["passed"]:
                out.ok = False
                where = f"; {req.output} was not written" if req.output is not None else ""
                out.failure = ("the ONNX export diverged from PyTorch eager (an export problem, not a folding one)"
                               + _check_message(check) + where)
                return out
        v = report.verification
        out.ok = v is None or v.passed
        return out
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
