"""Wrappers people hold their models in: ``torch.compile``'s ``OptimizedModule`` (``_orig_mod``),
``nn.DataParallel`` / ``DistributedDataParallel`` and ``swa_utils.AveragedModel`` (``.module``).

Their ``forward`` only hands its arguments on to the wrapped module (``*args, **kwargs``, which
``torch.fx`` cannot trace; an ``OptimizedModule`` has no ``forward`` of its own and a dynamo-compiled
function cannot be exported to ONNX), so :func:`bnfold.torch.fold` and :func:`bnfold.torch.convert`
fold the module inside: the result and the BN names in the report are the wrapped module's.
"""
from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


def inner_module(module: nn.Module) -> tuple[nn.Module, str, str] | None:
    """(wrapped module, attribute, wrapper label) for a known pass-through wrapper, else None."""
    cls = type(module)
    if module._forward_hooks or module._forward_pre_hooks:  # the wrapper's own hooks run in its call: keep it
        return None
    frame = sys.modules.get("torch._dynamo.eval_frame")  # never imported: no module was compiled (import is slow)
    optimized = getattr(frame, "OptimizedModule", None)
    if optimized is not None and isinstance(module, optimized):
        inner = module._orig_mod
        if isinstance(inner, nn.Module):
            return inner, "_orig_mod", "torch.compile's OptimizedModule"
    from torch.nn.parallel import DataParallel, DistributedDataParallel
    from torch.optim.swa_utils import AveragedModel
    if isinstance(module, (DataParallel, DistributedDataParallel, AveragedModel)):
        inner = module.module
        if isinstance(inner, nn.Module):
            return inner, "module", cls.__name__
    return None


def unwrap(module: nn.Module) -> tuple[nn.Module, list[str]]:
    """The module inside any pass-through wrappers, and a warning per wrapper taken off."""
    notes: list[str] = []
    path: list[str] = []
    while (found := inner_module(module)) is not None:
        module, attr, label = found
        path.append(attr)
        notes.append(f"{label} wraps the model: bnfold folded the module inside it ('{'.'.join(path)}'); "
                     "BN names and the result are that module's")
    return module, notes


@contextmanager
def uncompiled(module: nn.Module) -> Iterator[None]:
    """Each ``torch.compile``'d submodule replaced by the module it compiles while the block runs
    (``torch.onnx.export`` cannot trace a dynamo-optimized function); put back afterwards."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    frame = sys.modules.get("torch._dynamo.eval_frame")
    optimized = getattr(frame, "OptimizedModule", None)
    if optimized is not None:
        for parent in list(module.modules()):
            for name, child in list(parent._modules.items()):
                if isinstance(child, optimized) and inner_module(child) is not None:
                    parent._modules[name] = child._orig_mod
                    swapped.append((parent, name, child))
    try:
        yield
    finally:
        for parent, name, child in reversed(swapped):
            parent._modules[name] = child


def eager(module: nn.Module) -> nn.Module:
    """What to call for an eager forward of ``module``: the module a ``torch.compile``'d
    ``OptimizedModule`` (without hooks of its own) compiles, else ``module``. Calibration replaces
    BN forwards with bnfold's own Python (numpy included) for the run; called through the
    compiled wrapper, dynamo would compile that code, graph break after graph break (a two-BN
    network: 31 frames, 12 s, and torch's warnings on stderr), for a forward that runs once."""
    frame = sys.modules.get("torch._dynamo.eval_frame")
    optimized = getattr(frame, "OptimizedModule", None)
    while (optimized is not None and isinstance(module, optimized) and isinstance(module._orig_mod, nn.Module)
           and not (module._forward_hooks or module._forward_pre_hooks)):
        module = module._orig_mod
    return module

