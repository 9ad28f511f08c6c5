"""Write PyTorch modules out (ONNX, ExportedProgram, TorchScript) and check what was written.

* :func:`export_onnx`: ``torch.onnx.export(..., dynamo=False, do_constant_folding=False,
  opset_version=17)`` with the inputs named after forward's parameters, the outputs ``output``
  (one) or ``output_0``, ``output_1``, ... (pytree order), and a dynamic batch axis where the
  export allows it (else a static one, with a warning).
* :func:`save_exported_program`: ``torch.export.export`` (batch axis ``Dim.AUTO``) +
  ``torch.export.save``.
* :func:`save_torchscript`: ``torch.jit.trace`` + ``torch.jit.save``.
* :func:`compare_arrays`: the figures ``report.extra["export_check"]`` / ``["torch_check"]``
  hold, with the default tolerance of the output dtype, and the noise floor of the reference from
  a float64 run of the module (:func:`float64_oracle`): elements within ``MARGIN`` x floor pass too.

The caller stages files and moves them into place once they are checked.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import os
import re
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bnfold.errors import BadInputError, BnfoldError, UnsupportedModelError, one_line
from bnfold.torch.outputs import describe, leaves
from bnfold.torch.process_state import PROCESS_STATE_LOCK
from bnfold.torch.wrappers import uncompiled
from bnfold.verification.compare import compare_outputs
from bnfold.verification.noise_floor import MARGIN, floor_from_oracle

__all__ = [
    "ExportInfo", "compare_arrays", "export_onnx", "flat_outputs", "load_saved", "run_eager", "run_onnx",
    "save_exported_program", "save_torchscript",
]

OPSET = 17


@dataclass
class ExportInfo:
    input_names: list[str]
    output_names: list[str]
    dynamic_batch: bool
    warnings: list[str] = field(default_factory=list)


@contextlib.contextmanager
def _quiet(notes: list[str]) -> Iterator[None]:
    """Silence torch's export chatter; keep one note when the tracer saw value-dependent code.

    torch.onnx's TorchScript exporter logs its whole IR graph on stdout when an export fails
    ('Torch IR graph at exception: ...'; its ONNX log is on whatever the setting, as
    ``setup_onnx_logging`` tests the function ``_jit_is_onnx_log_enabled`` for truth): that log
    call is a no-op here, so a failure is bnfold's one error line.

    Both swaps (and ``warnings.catch_warnings``) are process-wide: threads exporting at once take
    turns (``PROCESS_STATE_LOCK``), else one leaving would restore what another had swapped in and
    leave the process with the log muted and its warnings recorded into a dead list."""
    with PROCESS_STATE_LOCK:
        log = torch._C._jit_onnx_log
        setattr(torch._C, "_jit_onnx_log", lambda *args: None)  # noqa: B010 - torch._C has no stubs for it
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                yield
        finally:
            setattr(torch._C, "_jit_onnx_log", log)  # noqa: B010
    tracer = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    if tracer:
        notes.append(
            "the trace for the export met Python code that depends on tensor values or shapes "
            f"({len(tracer)} TracerWarning(s), e.g. '{' '.join(str(tracer[0].message).split())[:120]}'); "
            "the exported model holds the path taken for the example inputs")


def flat_outputs(out: Any) -> list[torch.Tensor]:
    """The tensors of a forward's result, in container order (dicts, namedtuples, dataclasses,
    tuples and lists, nested: :mod:`bnfold.torch.outputs`)."""
    found = [t for _, t in leaves(out) if isinstance(t, torch.Tensor)]
    if not found:
        raise UnsupportedModelError("the model's forward returns no tensor")
    return found


def output_names(out: Any) -> list[str]:
    """Names for the tensors of a forward's result: ``output`` for one tensor; else the keys and
    field names on its path (``out``, ``aux``, ``logits_0``) or ``output_<i>`` for positions."""
    paths = [p for p, leaf in leaves(out) if isinstance(leaf, torch.Tensor)]
    if len(paths) == 1 and not paths[0]:
        return ["output"]
    names = []
    for path in paths:
        parts = [str(k) for k in path]
        keyed = any(isinstance(k, str) for k in path)
        names.append("_".join(parts) if keyed and parts else "output_" + "_".join(parts or ["0"]))
    if len(set(names)) != len(names):
        names = [f"output_{i}" for i in range(len(paths))]
    return names


# ----------------------------------------------------------------------------- containers the formats keep


def plain_outputs(out: Any) -> Any:
    """``out`` with each namedtuple made a tuple and each dataclass (or mapping other than
    ``dict``/``OrderedDict``) a dict of its fields: what torch.export, TorchScript and the ONNX
    exporter can all carry (torch.export.save cannot store a namedtuple class, and none of the
    three takes an unregistered dataclass)."""
    if isinstance(out, tuple) and hasattr(type(out), "_fields"):
        return tuple(plain_outputs(v) for v in out)
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return {f.name: plain_outputs(getattr(out, f.name)) for f in dataclasses.fields(out)}
    if isinstance(out, Mapping):
        items = [(k, plain_outputs(v)) for k, v in out.items()]
        return OrderedDict(items) if isinstance(out, OrderedDict) and type(out) is OrderedDict else dict(items)
    if isinstance(out, (tuple, list)):
        return type(out)(plain_outputs(v) for v in out)
    return out


def _needs_plain(out: Any) -> bool:
    if isinstance(out, tuple) and hasattr(type(out), "_fields"):
        return True
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return True
    if isinstance(out, Mapping):
        return type(out) not in (dict, OrderedDict) or any(_needs_plain(v) for v in out.values())
    if isinstance(out, (tuple, list)):
        return any(_needs_plain(v) for v in out)
    return False


class _PlainOutputs(nn.Module):
    """Calls the wrapped module and returns :func:`plain_outputs` of its result. Its ``forward``
    has the wrapped module's signature (torch.export binds ``dynamic_shapes`` to parameter names)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

        def forward(*args: Any, **kwargs: Any) -> Any:
            return plain_outputs(self.module(*args, **kwargs))

        with contextlib.suppress(TypeError, ValueError):
            forward.__signature__ = inspect.signature(module.forward)  # type: ignore[attr-defined]
        self.forward = forward


def _plain_target(module: nn.Module, result: Any, label: str, notes: list[str]) -> nn.Module:
    """``module``, or a :class:`_PlainOutputs` wrapper (in the module's mode) with a note saying
    what the written file returns instead, where ``result`` holds containers ``label`` cannot keep."""
    if not _needs_plain(result):
        return module
    notes.append(f"the {label} returns {describe(plain_outputs(result))} where the module returns "
                 f"{describe(result)} ({label} files cannot hold that Python class; same tensors, same order)")
    return _PlainOutputs(module).train(module.training)


def _result_of(module: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    saved = {k: v.detach().clone() for k, v in module.state_dict().items()}
    try:
        with torch.no_grad():
            return module(*args, **kwargs)
    finally:
        _restore(module, saved)


def run_eager(module: nn.Module, example: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [t.detach() for t in flat_outputs(module(**example))]


def eager_named(module: nn.Module, example: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """``{output name: array}`` of an eager run (names as :func:`output_names`)."""
    with torch.no_grad():
        result = module(**example)
    return dict(zip(output_names(result), (_to_numpy(t) for t in flat_outputs(result))))


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy()


# ----------------------------------------------------------------------------- ONNX


class _ByName(nn.Module):
    """Calls the wrapped module with every input by name: the legacy exporter hands ``kwargs`` on
    positionally, which a keyword-only parameter (after ``*``) refuses."""

    def __init__(self, module: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.module = module
        self.names = names

    def forward(self, *args: torch.Tensor) -> Any:
        return self.module(**dict(zip(self.names, args)))


def _more_parameters(module: nn.Module, names: list[str]) -> bool:
    """Whether forward has parameters the example does not give: the legacy exporter would make
    their defaults (``scale: float = 1.0``) graph inputs that no data feeds."""
    if isinstance(module, torch.jit.ScriptModule):
        return False
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return any(n not in names for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))


#: the last line of a TorchScript interpreter's traceback: the exception's (qualified) class and its message
_SCRIPT_ERROR = re.compile(r"^(?:builtins\.)?([A-Za-z_][\w.]*):(?:\s+(.*))?$")


def _forward_error_line(exc: BaseException) -> str:
    """``Class: message`` for an exception of the module's forward, on one line: for a TorchScript
    error, the class and message on its traceback's last line (``builtins.ValueError: ...``,
    ``RuntimeError: AssertionError: ...``), not the traceback."""
    text = str(exc).strip()
    if "TorchScript interpreter" in text:
        last = text.splitlines()[-1].strip()
        match = _SCRIPT_ERROR.match(last)
        inner = _SCRIPT_ERROR.match(match[2]) if match and match[1] == "RuntimeError" and match[2] else None
        if inner and re.fullmatch(r"[\w.]*(?:Error|Exception)", inner[1]):
            match = inner  # "RuntimeError: AssertionError: ..." (a scripted assert)
        if match:
            name, message = match[1], (match[2] or "").strip()
            return one_line(RuntimeError(f"{name}: {message}" if message else name), 200)
    return f"{type(exc).__name__}: {one_line(exc, 200)}"


def export_onnx(module: nn.Module, example: Mapping[str, torch.Tensor], path: str | os.PathLike, *,
                dynamic_batch: bool = True, preserve_training: bool = False,
                positional: list[str] | None = None) -> ExportInfo:
    """Export ``module`` called as ``module(**example)`` to an ONNX file at ``path``.

    ``positional``: the inputs that are forward's leading parameters, in order (the caller knows
    the signature). A TorchScript module gets those positionally (the legacy exporter trips over
    its keyword inputs); a module with other inputs (keyword-only ones), or with parameters the
    example leaves to their defaults, is called through a wrapper that names every input.
    """
    names = list(example)
    saved = {k: v.detach().clone() for k, v in module.state_dict().items()}
    try:
        with torch.no_grad():
            result = module(**example)
    except BnfoldError:
        raise
    except Exception as exc:  # noqa: BLE001 - the model's own forward on the data (no bnfold code runs in it):
        # an op failing on the samples, or the model's own raise or assert (AssertionError, a class of its own;
        # in TorchScript torch.jit.Error, no RuntimeError): the data or the model, not bnfold
        why = _forward_error_line(exc)
        raise BadInputError(f"the model's forward failed on the data samples ({why}); check that the data "
                            "matches the model's inputs") from exc
    finally:
        _restore(module, saved)
    outputs = flat_outputs(result)
    out_names = output_names(result)
    batch = None
    for t in example.values():
        if t.dim() >= 1:
            batch = int(t.shape[0])
            break
    notes: list[str] = []
    plain = _plain_target(module, result, "ONNX export", []) if not isinstance(module, torch.jit.ScriptModule) \
        else module  # its outputs are flat tensors by name in ONNX: no note
    training = torch.onnx.TrainingMode.PRESERVE if preserve_training else torch.onnx.TrainingMode.EVAL

    def attempt(dynamic: bool) -> None:
        axes = None
        if dynamic:
            axes = {n: {0: "batch"} for n, t in example.items() if t.dim() >= 1}
            for n, t in zip(out_names, outputs):
                if t.dim() >= 1 and batch is not None and int(t.shape[0]) == batch:
                    axes[n] = {0: "batch"}
        target: nn.Module = plain
        args: tuple[torch.Tensor, ...] = ()
        kwargs = dict(example)
        if positional is not None and positional == names and not _more_parameters(module, names):
            target, args, kwargs = plain, tuple(example.values()), {}
        elif positional is not None and not isinstance(module, torch.jit.ScriptModule):
            # in the module's own mode: the exporter restores the wrapper's mode afterwards, recursively
            target, args, kwargs = _ByName(plain, names).train(module.training), tuple(example.values()), {}
        with _quiet(notes), uncompiled(target):  # a torch.compile'd submodule: export what it compiles
            torch.onnx.export(target, args, os.fspath(path), kwargs=kwargs or None, dynamo=False,
                              do_constant_folding=False, opset_version=OPSET, input_names=names,
                              output_names=out_names, dynamic_axes=axes, training=training)

    dynamic = dynamic_batch and batch is not None
    try:
        attempt(dynamic)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds
        if not dynamic:
            raise UnsupportedModelError(
                f"torch.onnx.export failed: {type(exc).__name__}: {one_line(exc, 300)}") from exc
        try:
            attempt(False)
        except Exception as exc2:  # noqa: BLE001
            raise UnsupportedModelError(f"torch.onnx.export failed: {type(exc2).__name__}: "
                                        f"{one_line(exc2, 300)}") from exc2
        notes.append(f"the ONNX export has a static batch size of {batch}: exporting with a dynamic batch axis "
                     f"failed ({type(exc).__name__}: {one_line(exc, 160)})")
        dynamic = False
    return ExportInfo(names, out_names, dynamic, notes)


def run_eager_any(module: nn.Module, example: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """Eager outputs; a module in training mode (TorchScript) has its buffers restored afterwards."""
    saved = {k: v.detach().clone() for k, v in module.state_dict().items()}
    try:
        return run_eager(module, example)
    finally:
        _restore(module, saved)


def _restore(module: nn.Module, saved: Mapping[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, v in module.state_dict().items():
            if k in saved and v.shape == saved[k].shape:
                v.copy_(saved[k])


def run_onnx(path: str | os.PathLike, feeds: Mapping[str, np.ndarray]) -> tuple[list[str], list[np.ndarray]]:
    """Run an ONNX file on onnxruntime's CPU provider with graph optimisations off."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 4  # FATAL only: onnxruntime's colour error line stays off stderr
    try:
        sess = ort.InferenceSession(os.fspath(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        hint = ("; onnxruntime's CPU provider has no kernel for an operator in the model's dtype (float64 and "
                "bfloat16 Conv have none): write a .pt2 or .pt output, or convert the model to float32"
                if "NOT_IMPLEMENTED" in str(exc) else "")
        raise UnsupportedModelError(f"onnxruntime cannot load the ONNX export: {one_line(exc, 300)}{hint}") from exc
    feed = {}
    for i in sess.get_inputs():
        if i.name not in feeds:
            raise UnsupportedModelError(f"the ONNX export has an input '{i.name}' the data does not provide")
        arr = np.asarray(feeds[i.name])
        want = _ORT_TYPES.get(i.type)
        feed[i.name] = arr.astype(want) if want is not None and arr.dtype != want else arr
    try:
        values = sess.run(None, feed)
    except Exception as exc:  # noqa: BLE001
        raise UnsupportedModelError(f"onnxruntime cannot run the ONNX export on the data samples: "
                                    f"{one_line(exc, 300)}") from exc
    return [o.name for o in sess.get_outputs()], [np.asarray(v) for v in values]


_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


# ----------------------------------------------------------------------------- comparison


Tolerance = tuple[float | None, Mapping[str, float]]  # parse_tolerances: (global, {output: value})


def float64_oracle(module: nn.Module, example: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray] | None:
    """``{output name: array}`` of a float64 copy of ``module`` on ``example`` (float inputs cast to
    float64): the exact function the float32 run rounds. None where the module cannot run in
    float64 (a dtype fixed in its code, a TorchScript cast): the checks then have no floor."""
    try:
        # .double() on a copied TorchScript module reads .grad of non-leaf tensors
        with PROCESS_STATE_LOCK, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")
            double = copy.deepcopy(module).double()
        ex64 = {k: (v.double() if v.is_floating_point() else v) for k, v in example.items()}
        return eager_named(double, ex64)
    except Exception:  # noqa: BLE001 - any failure means: no oracle
        return None


def compare_arrays(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray], samples: int,
                   atol: Tolerance = (None, {}), rtol: Tolerance = (None, {}),
                   oracle: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """max abs / max rel error and the verdict per output and overall: ``--atol``/``--rtol``
    (per output, else global) where given, else the output dtype's default tolerance.

    ``oracle``: the reference computed in float64 (:func:`float64_oracle`); the floor is then
    ``|reference - oracle|`` per channel, and an element within ``MARGIN`` x floor passes too.
    ``noise_floor`` in the result: ``{"method": "float64", "margin": ...}``, or ``"off"``.
    """
    floors = floor_from_oracle(reference, oracle) if oracle is not None else None
    metrics = compare_outputs(dict(reference), dict(candidate), atol=atol, rtol=rtol, floors=floors)
    outputs = [{"name": m.name, "dtype": m.dtype, "max_abs": float(m.max_abs), "max_rel": float(m.max_rel),
                "atol": float(m.atol), "rtol": float(m.rtol), "passed": bool(m.passed),
                "floor_max": m.floor_max} for m in metrics]
    return {
        "max_abs": max((float(m.max_abs) for m in metrics), default=0.0),
        "max_rel": max((float(m.max_rel) for m in metrics), default=0.0),
        "passed": all(o["passed"] for o in outputs),
        "samples": int(samples),
        "outputs": outputs,
        "noise_floor": {"method": "float64", "margin": MARGIN} if floors is not None else "off",
        "rule": ("|candidate - reference| <= atol + rtol * |reference|"
                 + (f" or |candidate - reference| <= {MARGIN:g} * floor" if floors is not None else "")),
    }


def tensors_to_arrays(names: list[str], tensors: list[torch.Tensor]) -> dict[str, np.ndarray]:
    return {n: _to_numpy(t) for n, t in zip(names, tensors)}


# ----------------------------------------------------------------------------- torch formats


def _names_of(args: tuple[torch.Tensor, ...], kwargs: Mapping[str, torch.Tensor],
              arg_names: list[str]) -> dict[str, torch.Tensor]:
    return {**dict(zip(arg_names, args)), **dict(kwargs)}


def save_exported_program(module: nn.Module, args: tuple[torch.Tensor, ...], kwargs: Mapping[str, torch.Tensor],
                          arg_names: list[str], path: Path, *, dynamic_batch: bool = True) -> list[str]:
    """``torch.export.export(module, args, kwargs)`` + ``torch.export.save`` to ``path``; returns notes.

    ``arg_names`` name the positional ``args`` (forward's parameters), for ``dynamic_shapes``.
    """
    notes: list[str] = []
    Dim = torch.export.Dim
    if dynamic_batch:
        args, kwargs = _batch_of_two(args, kwargs)
    named = _names_of(args, kwargs, arg_names)
    target = _plain_target(module, _result_of(module, args, kwargs), "ExportedProgram", notes)

    def export(dynamic: bool) -> Any:
        shapes = {n: ({0: Dim.AUTO} if t.dim() >= 1 else None) for n, t in named.items()} if dynamic else None
        with _quiet(notes):
            return torch.export.export(target, tuple(args), kwargs=dict(kwargs), dynamic_shapes=shapes, strict=False)

    try:
        ep = export(dynamic_batch)
    except Exception as exc:  # noqa: BLE001
        if not dynamic_batch:
            raise UnsupportedModelError(
                f"torch.export.export failed: {type(exc).__name__}: {one_line(exc, 300)}") from exc
        try:
            ep = export(False)
        except Exception as exc2:  # noqa: BLE001
            raise UnsupportedModelError(f"torch.export.export failed: {type(exc2).__name__}: "
                                        f"{one_line(exc2, 300)}") from exc2
        notes.append(f"the ExportedProgram has a static batch size: a dynamic batch axis failed "
                     f"({type(exc).__name__}: {one_line(exc, 160)})")
    else:
        static = _static_batch_inputs(ep) if dynamic_batch else []
        if static:
            notes.append(f"the ExportedProgram has a static batch size: torch.export specialised the first axis "
                         f"of {', '.join(repr(n) for n in static)} (the model's code fixes it)")
    torch.export.save(ep, os.fspath(path))
    return notes


def _batch_of_two(args: tuple[torch.Tensor, ...], kwargs: Mapping[str, torch.Tensor]) -> tuple[
        tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """Inputs that all have a batch of one, repeated to two: torch.export specialises a dimension
    of size 1 to a constant even under ``Dim.AUTO``, which would fix the written model's batch at 1."""
    tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.dim() >= 1]
    if not tensors or any(t.shape[0] != 1 for t in tensors):
        return tuple(args), dict(kwargs)

    def two(t: Any) -> Any:
        return torch.cat([t, t]) if isinstance(t, torch.Tensor) and t.dim() >= 1 else t

    return tuple(two(t) for t in args), {k: two(v) for k, v in kwargs.items()}


def _static_batch_inputs(ep: Any) -> list[str]:
    """User inputs of an ExportedProgram whose first axis is a constant, not a symbol (a SymInt
    that ``Dim.AUTO`` specialised is concrete)."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    names = set(ep.graph_signature.user_inputs)
    static = []
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in names:
            continue
        val = node.meta.get("val")
        shape = getattr(val, "shape", None)
        if shape is not None and len(shape) >= 1 and is_concrete_int(shape[0]):
            static.append(node.name)
    return static


#: torch.jit.trace's refusals of an output structure (None, numbers, strings, mixed dict values among the outputs)
_TRACE_OUTPUT_REFUSALS = ("Tracer cannot infer type of", "cannot be understood by the tracer",
                          "can be output from traced functions")


def save_torchscript(module: nn.Module, args: tuple[torch.Tensor, ...], kwargs: Mapping[str, torch.Tensor],
                     arg_names: list[str], path: Path) -> list[str]:
    """``torch.jit.trace`` + ``torch.jit.save`` to ``path``; returns notes."""
    notes: list[str] = []
    result = _result_of(module, args, kwargs)
    target = _plain_target(module, result, "TorchScript module", notes)
    if type(plain_outputs(result)) is OrderedDict:
        notes.append("the TorchScript module returns a dict where the module returns an OrderedDict (same keys, "
                     "same order)")
    try:
        with _quiet(notes):
            if kwargs:
                traced = torch.jit.trace(target, example_kwarg_inputs=_names_of(args, kwargs, arg_names),
                                         check_trace=False, strict=False)
            else:
                traced = torch.jit.trace(target, tuple(args), check_trace=False, strict=False)
    except Exception as exc:  # noqa: BLE001
        if any(m in str(exc) for m in _TRACE_OUTPUT_REFUSALS):  # its message may go on with the output's values
            raise UnsupportedModelError(
                "torch.jit.trace cannot hold the model's output structure in TorchScript (only tensors, and "
                "lists, tuples and dicts of tensors: no None, numbers, strings or empty containers, a dict's "
                "values all of one type); use a .pt2 or .onnx output") from exc
        raise UnsupportedModelError(f"torch.jit.trace failed: {type(exc).__name__}: {one_line(exc, 300)}") from exc
    torch.jit.save(traced, os.fspath(path))
    return notes


def load_saved(path: Path, kind: str) -> nn.Module:
    """Read back what :func:`save_exported_program` / :func:`save_torchscript` wrote."""
    if kind == "pt2":
        return torch.export.load(str(path)).module()
    with PROCESS_STATE_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path), map_location="cpu")
