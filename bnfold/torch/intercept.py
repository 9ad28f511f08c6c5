"""Catch the BN computation itself: ``F.batch_norm`` calls on a known module's buffers.

A BN subclass that overrides ``forward`` (mmcv-style, ``SyncBatchNormAct``) or a hand-written BN module
still normalises through ``F.batch_norm`` on its own ``running_mean``/``running_var`` (or, with
``track_running_stats=False``, its own ``weight``). During calibration a
``torch.overrides.TorchFunctionMode`` sees every such call; one whose buffers (by identity) belong
to a calibration target goes to that target's handler (which normalises with the batch's
statistics and accumulates them); every other call runs unchanged. The mode is only entered
where such modules exist, so a network of plain BNs keeps torch's fast path.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["BatchNormIntercept", "batch_norm_args"]

_NAMES = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
#: ``torch.batch_norm`` (the op ``F.batch_norm`` calls; hand-written BNs call it too) takes them in this order
_TORCH_NAMES = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps",
                "cudnn_enabled")

#: handler(owner name, input, weight, bias, eps, forced) -> the normalised batch; ``forced``: the call
#: passes running statistics with ``training=True`` (it normalises with batch statistics in any mode)
Handler = Callable[[str, torch.Tensor, "torch.Tensor | None", "torch.Tensor | None", float, bool], torch.Tensor]


def batch_norm_args(args: tuple[Any, ...], kwargs: dict[str, Any], names: tuple[str, ...] = _NAMES) -> dict[str, Any]:
    """``F.batch_norm``'s arguments by name (``torch.batch_norm``'s with ``names=_TORCH_NAMES``),
    defaults filled in."""
    out: dict[str, Any] = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
    out.update(zip(names, args))
    out.update(kwargs)
    return out


class BatchNormIntercept(TorchFunctionMode):
    """Route ``F.batch_norm`` calls on the tensors of ``owners`` (``id(tensor)`` -> owner name:
    each target's running mean, or its weight where it has no running statistics) to ``handler``."""

    def __init__(self, owners: dict[int, str], handler: Handler) -> None:
        super().__init__()
        self.owners = owners
        self.handler = handler
        self.seen: dict[str, int] = {}  # owner name -> intercepted calls, over the whole run

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.batch_norm or func is torch.batch_norm:
            a = batch_norm_args(args, kwargs, _NAMES if func is F.batch_norm else _TORCH_NAMES)
            name = None
            for key in ("running_mean", "weight"):
                t = a[key]
                if t is not None and id(t) in self.owners:
                    name = self.owners[id(t)]
                    break
            if name is not None:
                self.seen[name] = self.seen.get(name, 0) + 1
                forced = bool(a["training"]) and a["running_mean"] is not None
                return self.handler(name, a["input"], a["weight"], a["bias"], float(a["eps"]), forced)
        return func(*args, **kwargs)
