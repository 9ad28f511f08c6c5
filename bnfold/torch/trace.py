"""The data flow of a PyTorch module as an ``fx.GraphModule``, checked against the module itself.

``torch.fx`` symbolic tracing runs ``forward`` once with proxies instead of tensors, so whatever
``forward`` decides from its inputs' Python values is decided once, at trace time, and silently:

* ``isinstance(x, torch.Tensor)`` is False for a proxy (MONAI's ``UpCat`` drops its skip
  concatenation that way), ``if mask is not None`` is True for a proxy of an argument the data
  never gives, a branch on a tensor's value raises;
* forward hooks and pre-hooks of every module that is traced *through* (the root, containers,
  custom blocks) are not part of the graph; only leaf modules (torch's own layers, every BN) are
  called as modules and keep theirs.

So :func:`trace` passes ``None`` for each optional argument (default ``None``) that the example
does not give, and, given an example, runs the traced module next to the original on it: the two
must agree (same structure, values to a relative 1e-4 of the output's scale), else
:class:`UnsupportedModelError`, which the CLI answers by folding through an ONNX export instead.
Without an example the check cannot be made, and hooks on traced-through modules are refused.

Outputs keep the module's own container type: fx rebuilds a namedtuple itself, and the tracer
here rebuilds an ``OrderedDict`` (fx would make it a plain ``dict``) and a dataclass instance (fx
refuses one) as a call of their class in the graph's code. The check compares containers by
structure and values (:mod:`bnfold.torch.outputs`), not by Python type.
"""
from __future__ import annotations

import dataclasses
import inspect
import keyword
from collections import OrderedDict
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from bnfold.errors import BadInputError, UnsupportedModelError, one_line
from bnfold.torch.batches import Batch
from bnfold.torch.bn_kinds import bn_kind
from bnfold.torch.outputs import describe, leaves, structure
from bnfold.torch.wrappers import inner_module as wrapped

__all__ = ["hooked_modules", "trace"]

_ONNX_ADVICE = ("export the model to ONNX in eval mode (torch.onnx.export(..., dynamo=False, "
                "do_constant_folding=False)) and fold the .onnx file instead")


class _Tracer(fx.Tracer):
    """fx's tracer, keeping every BN-like module (:mod:`bnfold.torch.bn_kinds`) as one ``call_module`` node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if bn_kind(m) is not None:
            return True
        if wrapped(m) is not None:  # DataParallel & co.: traced through (call_module), not a leaf
            return False
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A pass-through wrapper child (``torch.compile``'d, ``DataParallel``, ``AveragedModel``) is
        traced as the call of the module inside (``backbone._orig_mod``, ``backbone.module``): as a
        leaf its BNs would not be in the graph, and a compiled function cannot be traced at all."""
        inner = wrapped(m)
        if inner is not None:
            return inner[0](*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def create_arg(self, a: Any) -> Any:
        """fx's argument, except that an ``OrderedDict`` and a dataclass instance (a forward's
        result, usually) become a call of their class, so the traced module returns the same type."""
        if type(a) is OrderedDict:
            return self.create_node("call_function", OrderedDict, (self.create_arg(list(a.items())),), {})
        if (dataclasses.is_dataclass(a) and not isinstance(a, type)
                and all(f.init for f in dataclasses.fields(a))):
            fields = {f.name: self.create_arg(getattr(a, f.name)) for f in dataclasses.fields(a)}
            return self.create_node("call_function", type(a), (), fields)
        return super().create_arg(a)


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def hooked_modules(module: nn.Module) -> list[str]:
    """Modules that fx traces *through* and whose forward hooks the graph would lose ('' = the
    root); a global forward hook counts as one on the root."""
    tracer = _Tracer()
    found: list[str] = []
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        found.append("(global forward hooks)")

    def walk(m: nn.Module, name: str) -> None:
        if name and tracer.is_leaf_module(m, name):
            return  # called as a module: its hooks run, and what is inside is not traced
        if _has_hooks(m):
            found.append(name)
        for child_name, child in m.named_children():
            walk(child, f"{name}.{child_name}" if name else child_name)

    walk(module, "")
    return found


def _concrete_none(module: nn.Module, example: Batch | None) -> dict[str, Any]:
    """``None`` for each parameter of ``forward`` that defaults to None and the example omits."""
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return {}
    params = sig.parameters
    given: set[str] = set()
    if example is not None:
        try:
            given = set(sig.bind_partial(*example.args, **example.kwargs).arguments)
        except TypeError:
            return {}
    return {n: None for n, p in params.items()
            if p.default is None and n not in given
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def trace(module: nn.Module, example: Batch | None = None, *, allow_unchecked_hooks: bool = False) -> fx.GraphModule:
    """``module`` as an ``fx.GraphModule``; :class:`UnsupportedModelError` where symbolic tracing
    fails, or where the traced module computes something else than ``module`` on ``example``
    (a :class:`Batch`; run under ``no_grad`` with both in their current mode, normally eval).

    Without ``example``, a module whose hooks the graph would lose is refused, unless
    ``allow_unchecked_hooks`` (a caller that checks a later trace on an example).
    """
    name = type(module).__name__
    hooked = hooked_modules(module)
    if hooked and example is None and not allow_unchecked_hooks:
        shown = ", ".join(f"'{h}'" if h else "the root module" for h in hooked[:3])
        raise UnsupportedModelError(
            f"{shown} of {name} {'has' if len(hooked) == 1 else 'have'} forward hooks, which torch.fx tracing "
            "leaves out; give data or example inputs so bnfold can check that the traced module computes the "
            f"same, remove the hooks, or {_ONNX_ADVICE}")
    tracer = _Tracer()
    concrete = _concrete_none(module, example)
    try:
        graph = tracer.trace(module, concrete_args=concrete or None)
    except Exception as exc:  # fx raises TraceError, TypeError, RuntimeError, ... on dynamic code
        raise UnsupportedModelError(
            f"torch.fx tracing failed for {name} ({type(exc).__name__}: {one_line(exc, 200)}); {_ONNX_ADVICE}"
        ) from exc
    bad = _unwritable_target(module, graph)
    if bad is not None:
        raise UnsupportedModelError(
            f"the name {bad!r} in {name} is not a Python attribute name torch.fx can write (a dot, quote, "
            f"backslash, line break or keyword): rename it (add_module), or {_ONNX_ADVICE}")
    try:
        gm = fx.GraphModule(tracer.root, graph, name)
    except Exception as exc:  # fx's generated code does not compile: a case _unwritable_target misses
        raise UnsupportedModelError(
            f"torch.fx could not build a module from the trace of {name} ({type(exc).__name__}: "
            f"{one_line(exc, 200)}); {_ONNX_ADVICE}") from exc
    if example is not None:
        _check_faithful(module, gm, example, name)
    return gm


def _unwritable_target(module: nn.Module, graph: fx.Graph) -> str | None:
    """The first name (one path component) of a submodule, parameter or buffer the graph uses
    that fx's code generation cannot write: one with a dot (fx reads it as a path), a keyword
    (``self.for``), or a character that breaks or changes its string literal (``getattr(self,
    "bn\nx")``: a line break, a quote, a backslash, a NUL)."""
    paths: dict[str, tuple[str, ...]] = {}
    seen: set[int] = set()

    def walk(m: nn.Module, path: tuple[str, ...]) -> None:  # each module once, at its first path, as fx names it
        if id(m) in seen:
            return
        seen.add(id(m))
        paths.setdefault(".".join(path), path)
        # named_*(recurse=False): a TorchScript submodule's _parameters / _buffers cannot be unpacked
        for n, _ in (*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)):
            paths.setdefault(".".join((*path, n)), (*path, n))
        for n, child in m._modules.items():
            if child is not None:
                walk(child, (*path, n))

    walk(module, ())
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr") and isinstance(node.target, str):
            for part in paths.get(node.target, ()):
                if ("." in part or keyword.iskeyword(part) or any(c in part for c in '\n\r"\\\0')):
                    return part
    return None


def _check_faithful(module: nn.Module, gm: fx.GraphModule, example: Batch, name: str) -> None:
    gm.train(module.training)
    with torch.no_grad():
        try:
            ref = module(*example.args, **example.kwargs)
        except Exception as exc:
            raise BadInputError(f"the model's forward failed on the data ({type(exc).__name__}: "
                                f"{one_line(exc, 200)}); check that the data matches the model's inputs") from exc
        try:
            got = gm(*example.args, **example.kwargs)
        except Exception as exc:
            raise UnsupportedModelError(
                f"torch.fx traced {name} into a module that fails on the data ({type(exc).__name__}: "
                f"{one_line(exc, 160)}): forward branches on its inputs in a way symbolic tracing fixes once "
                f"(isinstance, `is None`, shapes); {_ONNX_ADVICE}") from exc
    problem = _difference(ref, got)
    if problem is not None:
        raise UnsupportedModelError(
            f"torch.fx traced {name} into a module that computes something else on the data ({problem}): "
            "forward branches on its inputs in a way symbolic tracing fixes once (isinstance, `is None`), "
            f"has hooks that change outputs, or is not deterministic; {_ONNX_ADVICE}")


def _difference(ref: Any, got: Any) -> str | None:
    """None where ``got`` matches ``ref`` (same containers by keys and lengths, whatever their Python
    type; tensors to 1e-4 of the output's scale)."""
    if structure(ref) != structure(got):
        return f"its outputs have another structure ({describe(got)}, not {describe(ref)})"
    ref_leaves = [leaf for _, leaf in leaves(ref)]
    got_leaves = [leaf for _, leaf in leaves(got)]
    for i, (a, b) in enumerate(zip(ref_leaves, got_leaves)):
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            return f"output {i} is a tensor on one side only"
        if not isinstance(a, torch.Tensor):
            if a != b:
                return f"output {i} is {b!r}, not {a!r}"
            continue
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"output {i} has shape {tuple(b.shape)} {b.dtype}, not {tuple(a.shape)} {a.dtype}"
        if not a.is_floating_point() and not a.is_complex():
            if not torch.equal(a, b):
                return f"output {i} differs"
            continue
        if a.is_complex():  # compare real and imaginary parts
            a64 = torch.view_as_real(a.detach().to(torch.complex128).resolve_conj())
            b64 = torch.view_as_real(b.detach().to(torch.complex128).resolve_conj())
        else:
            a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
        finite = torch.isfinite(a64)
        scale = float(a64[finite].abs().max()) if bool(finite.any()) else 0.0
        same_nonfinite = torch.equal(torch.isfinite(b64), finite) and torch.equal(a64[~finite].nan_to_num(),
                                                                                 b64[~finite].nan_to_num())
        diff = float((a64[finite] - b64[finite]).abs().max()) if bool(finite.any()) else 0.0
        if not same_nonfinite or diff > 1e-4 * max(scale, 1e-30):
            return f"output {i} differs by up to {diff:.3g} at a scale of {scale:.3g}"
    return None
