"""``bnfold fold`` for a PyTorch model: options in, :func:`bnfold.torch.convert` called, terminal
wording out.

The library's messages name its parameters (``data``, ``device='cuda'``, ``allow_reused_bn=True``);
``cli/main.py`` shows its errors, warnings and report in flag words (``cli/wording.py``), as for
an ONNX model. The check lines and the exit-1 messages are written here.

Importing this module does not import torch: :func:`_frontend` does, when a PyTorch model is
folded (``bnfold --help`` and usage errors never pay for it).
"""
from __future__ import annotations

import builtins
import contextlib
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import click

from bnfold.output_formats import FORMAT_LABELS, torch_output_format
from bnfold.outputs import Outputs

from .files import check_paths, report_outputs, require_data, require_model_file
from .options import DataConfig, FoldCheck, ReportConfig, TorchOptions
from .outcome import FoldOutcome

if TYPE_CHECKING:  # pragma: no cover
    from bnfold.torch import ConvertResult, TensorCheck

__all__ = ["is_torch_model", "run", "validate"]

#: MODEL suffixes read as PyTorch files even when their content does not say so (the PyTorch
#: loader then names what is wrong); other files are PyTorch files when they are zip archives or
#: pickles (an ONNX file is a protobuf: neither)
_TORCH_MODEL_SUFFIXES = {".pt", ".pth", ".pt2", ".ts", ".torchscript", ".ptl", ".ckpt"}

def _frontend() -> ModuleType:
    """``bnfold.torch`` (imports torch): the one place the CLI imports it."""
    import bnfold.torch

    return bnfold.torch


def is_torch_model(path: Path) -> bool:
    """Whether fold reads ``path`` as a PyTorch model (``.onnx`` never is)."""
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return False
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return suffix in _TORCH_MODEL_SUFFIXES
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return True
    return suffix in _TORCH_MODEL_SUFFIXES


def validate(model: Path | None, output: Path | None, frozen_output: Path | None, data: DataConfig,
             report: ReportConfig, dry_run: bool, topts: TorchOptions) -> Path | None:
    """The usage checks of a PyTorch fold (exit 2, or 3 for a missing file), before torch is
    imported; returns MODEL (None with --model-factory)."""
    if topts.model_factory is not None:
        if model is not None and str(model) != "-":
            raise click.UsageError("MODEL must be omitted (or '-') with --model-factory: the factory builds the "
                                   "model and --weights gives its state_dict.")
        model = None
    elif topts.weights is not None:
        raise click.UsageError("--weights needs --model-factory (the state_dict is loaded into the factory's model).")
    if output is None and not dry_run:
        raise click.UsageError("Missing option '-o' / '--output' (required unless --dry-run).")
    if data.batch_size is not None and not data.given:
        raise click.UsageError("--batch-size needs --data.")
    fmt = None
    if output is not None:
        fmt = torch_output_format(output)
        if fmt is None:
            raise click.BadParameter(
                f"{output.suffix or 'no suffix'}: for a PyTorch model OUTPUT ends in .onnx, .pt2, .pt, .ts or "
                ".torchscript (the suffix picks the format)", param_hint="'-o' / '--output'")
    if frozen_output is not None:
        ffmt = torch_output_format(frozen_output)
        if ffmt is None or (fmt is not None and ffmt != fmt):
            raise click.BadParameter("for a PyTorch model it must be written in OUTPUT's format (same kind of "
                                     "suffix as -o).", param_hint="'--frozen-output'")
    if model is not None:
        require_model_file(model)
    check_paths([(model, "the input MODEL"), (topts.weights, "the --weights file"), (data.path, "the --data file")],
                [(output, "'-o' / '--output'"), (frozen_output, "'--frozen-output'"), *report_outputs(report)])
    if data.path is not None:
        require_data(data.path)
    return model


@contextlib.contextmanager
def _no_fx_error_dumps() -> Iterator[None]:
    """torch.fx prints a traceback and the failing line of generated code on stderr whenever a
    GraphModule's forward raises (``_WrappedCall.__call__``: an ExportedProgram's module, a traced
    one) before re-raising; bnfold turns the error into its one line, so those prints are dropped."""
    import torch.fx.graph_module as fx_graph_module

    def quiet_print(*args: Any, **kwargs: Any) -> None:
        if kwargs.get("file") is not sys.stderr:
            builtins.print(*args, **kwargs)

    had = "print" in vars(fx_graph_module)
    old = vars(fx_graph_module).get("print")
    fx_graph_module.print = quiet_print  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if had:
            fx_graph_module.print = old  # type: ignore[attr-defined]
        else:
            del fx_graph_module.print  # type: ignore[attr-defined]


def run(model: Path | None, output: Path | None, frozen_output: Path | None, data: DataConfig, estimator: str,
        check: FoldCheck, config: Any, dry_run: bool, topts: TorchOptions,
        progress: Callable[[int, int | None], None] | None, warn: Callable[[str], None], outputs: Outputs,
        recalibrate: str = "training", target_se: float = 0.01) -> FoldOutcome:
    """Load the model (file, or factory and weights) and convert it. Its errors and ``warn``'s
    messages are in the library's words: the caller shows them in flag words (``cli/wording.py``)."""
    frontend = _frontend()
    device = frontend.resolve_device(topts.device)  # before the model is read: exit 4 comes first
    with _no_fx_error_dumps():
        return _run(frontend, device, model, output, frozen_output, data, estimator, check, config, dry_run, topts,
                    progress, warn, outputs, recalibrate, target_se)


def _run(frontend: ModuleType, device: Any, model: Path | None, output: Path | None, frozen_output: Path | None,
         data: DataConfig, estimator: str, check: FoldCheck, config: Any, dry_run: bool, topts: TorchOptions,
         progress: Callable[[int, int | None], None] | None, warn: Callable[[str], None], outputs: Outputs,
         recalibrate: str, target_se: float) -> FoldOutcome:
    if topts.model_factory is not None:
        loaded = frontend.load_factory(topts.model_factory, topts.weights)
    else:
        assert model is not None
        loaded = frontend.load_model_file(model, unsafe_pickle=topts.unsafe_pickle, warn=warn)
    result: ConvertResult = frontend.convert(
        loaded, data.source(), output, frozen_output=frozen_output, batch_size=data.batch_size,
        estimator=estimator, device=device, allow_reused_bn=topts.allow_reused_bn, verify=check.enabled,
        verify_samples=check.samples, config=config, dry_run=dry_run, progress=progress, warn=warn,
        outputs=outputs, recalibrate=recalibrate, training_graph=topts.training_graph, target_se=target_se,
        inplace=True)  # read from a file for this run alone: calibrated without a copy of its weights
    report = result.report
    lines = []
    if result.route == "torch":
        if result.torch_check is not None:
            lines.append(_check_line("Torch check (folded vs frozen, eager float32)", result.torch_check))
        if result.export_check is not None:
            label = FORMAT_LABELS[torch_output_format(output) or "onnx"] if output is not None else "ONNX"
            lines.append(_check_line(f"Export check ({label} file vs folded module, eager)", result.export_check))
    elif result.export_check is not None:
        lines.append(_check_line("Export check (PyTorch eager vs ONNX export on onnxruntime)", result.export_check))
    plan_rows = list(result.plan) if result.plan is not None else None
    return FoldOutcome(report=report, ok=result.passed, failure=_failure(result, output), lines=tuple(lines),
                       plan_rows=plan_rows)


def _check_line(title: str, check: TensorCheck) -> str:
    verdict = "passed" if check.passed else "FAILED"
    floors = [o.floor_max for o in check.outputs if o.floor_max is not None]
    floor = (f", noise floor {max(floors):.3g} (float64 oracle, margin {check.noise_floor['margin']:g})"
             if floors and isinstance(check.noise_floor, Mapping) else "")
    return (f"{title} ({check.samples} samples): max abs {check.max_abs:.3g}, "
            f"max rel {check.max_rel:.3g}{floor} -> {verdict}")


def _check_message(check: TensorCheck) -> str:
    bad = [o.name for o in check.outputs if not o.passed]
    where = f" at output(s) {', '.join(bad)}" if bad else ""
    return f"{where} on {check.samples} sample(s): max abs diff {check.max_abs:.3g}, " \
           f"max rel diff {check.max_rel:.3g}"


def _failure(result: ConvertResult, output: Path | None) -> str | None:
    """The exit-1 message of a failed torch or export check (None: passed, or the ONNX
    verification failed, whose message the fold command builds from the report)."""
    not_written = f"; {output} was not written" if output is not None else ""
    if result.failed == "torch_check" and result.torch_check is not None:
        return ("the folded module diverged from the frozen module in eager PyTorch"
                + _check_message(result.torch_check) + not_written)
    if result.failed == "export_check" and result.export_check is not None:
        if result.route == "torch":
            label = FORMAT_LABELS[torch_output_format(output) or "onnx"] if output is not None else "ONNX"
            return (f"the {label} export diverged from the folded PyTorch module (an export problem, not a "
                    "folding one)" + _check_message(result.export_check) + not_written)
        return ("the ONNX export diverged from PyTorch eager (an export problem, not a folding one)"
                + _check_message(result.export_check) + not_written)
    return None
