"""Which modules compute a BatchNorm, and what bnfold knows about each (issue 16 point 1).

* ``STANDARD``: a torch ``_BatchNorm`` (BatchNorm1d/2d/3d, SyncBatchNorm, lazy BNs, subclasses
  that keep their forward, e.g. mmcv's ``_BatchNormXd``): calibrated through its forward, folded.
* ``BN_ACT``: timm's ``BatchNormAct2d`` (a ``BatchNorm2d`` whose forward is ``F.batch_norm`` on its
  buffers, then ``drop``, then ``act``): calibrated as a standard BN followed by its ``drop`` and
  ``act``; folding moves the BN part into the producer and leaves ``act(drop(x))``.
* ``FROZEN_AFFINE``: torchvision's ``FrozenBatchNorm2d`` (buffers ``weight``, ``bias``,
  ``running_mean``, ``running_var`` and ``eps``: an affine by design, never calibrated): folded.
* ``CUSTOM``: any other ``_BatchNorm`` subclass overriding forward (or a BN whose instance has a
  ``forward`` of its own, set on the instance), or a module with
  ``running_mean``/``running_var`` buffers: calibrated where its forward calls ``F.batch_norm`` on
  those buffers (else an error), never folded (``UNKNOWN_BN_FORWARD``): bnfold cannot tell what
  else its forward computes.
"""
from __future__ import annotations

import enum
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import SyncBatchNorm, _BatchNorm

__all__ = ["BnKind", "ActPart", "bn_kind", "bn_like_modules", "is_standard_bn"]

_BN_FORWARDS = (_BatchNorm.forward, SyncBatchNorm.forward)


class BnKind(enum.Enum):
    STANDARD = "standard"
    BN_ACT = "bn_act"
    FROZEN_AFFINE = "frozen_affine"
    CUSTOM = "custom"


def _own_forward(m: nn.Module) -> bool:
    """``m.forward`` replaced on the instance (``m.forward = types.MethodType(f, m)``, accelerate's
    hooks): its class's forward is not what it computes."""
    return "forward" in getattr(m, "__dict__", {})


def is_standard_bn(m: nn.Module) -> bool:
    """A BatchNorm1d/2d/3d, SyncBatchNorm or LazyBatchNorm (or subclass keeping their forward)."""
    return isinstance(m, _BatchNorm) and type(m).forward in _BN_FORWARDS and not _own_forward(m)


def _buffer(m: nn.Module, name: str) -> Any:
    """``m._buffers.get(name)``; a scripted module's ``_buffers`` (torch.jit's ``OrderedDictWrapper``) lacks ``get``."""
    buffers = m._buffers
    return buffers[name] if name in buffers else None


def _has_stats(m: nn.Module) -> bool:
    mean, var = _buffer(m, "running_mean"), _buffer(m, "running_var")
    return isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor) and mean.dim() == 1


def bn_kind(m: nn.Module) -> BnKind | None:
    """The kind of a BN-like module, None for any other module."""
    if isinstance(m, _BatchNorm):
        if _own_forward(m):
            return BnKind.CUSTOM
        if type(m).forward in _BN_FORWARDS:
            return BnKind.STANDARD
        if (type(m).__name__ == "BatchNormAct2d" and isinstance(getattr(m, "act", None), nn.Module)
                and isinstance(getattr(m, "drop", None), nn.Module)):
            return BnKind.BN_ACT
        return BnKind.CUSTOM
    if not _has_stats(m):
        return None
    if (type(m).__name__ == "FrozenBatchNorm2d" and not _own_forward(m)
            and isinstance(_buffer(m, "weight"), torch.Tensor) and isinstance(_buffer(m, "bias"), torch.Tensor)
            and isinstance(getattr(m, "eps", None), float)):
        return BnKind.FROZEN_AFFINE
    return BnKind.CUSTOM


def bn_like_modules(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every BN-like submodule once (an aliased module under its first name), in module order."""
    return [(name, m) for name, m in module.named_modules() if bn_kind(m) is not None]


class ActPart(nn.Module):
    """What is left of a folded ``BatchNormAct2d``: its ``drop`` then its ``act``."""

    def __init__(self, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.drop = drop
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.act(self.drop(x))
        return out
