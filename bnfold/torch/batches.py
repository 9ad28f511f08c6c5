"""Calibration batches for the PyTorch front end.

``data`` is anything that yields batches; each batch becomes one call ``module(*args, **kwargs)``:

* a ``torch.Tensor`` or ``numpy.ndarray`` item: ``module(x)``;
* a tuple or list item: ``module(*item)`` (a ``DataLoader`` over a ``TensorDataset`` yields lists);
* a mapping item: ``module(**item)``.

``data`` itself may be a list, a generator, a ``DataLoader`` or any other iterable of such items.
A single tensor, array or mapping passed as ``data`` is one batch (iterating a tensor would walk
its samples, not batches). Tensors are moved to the calibration device; numpy arrays become
tensors, floating ones in the model's floating dtype (numpy's float64 default would not run in
a float32 model). Values that are neither tensors nor arrays (ints, strings, None) pass unchanged.
"""
from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from bnfold.errors import BadInputError

__all__ = ["Batch", "as_batch", "check_arity", "count_batches", "iter_batches"]


@dataclass
class Batch:
    """One forward call's inputs, already on the calibration device."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int | None:
        """The leading dimension of the first tensor input (the batch size), if any."""
        for v in list(self.args) + list(self.kwargs.values()):
            t = _first_tensor(v)
            if t is not None:
                return int(t.shape[0]) if t.dim() >= 1 else None
        return None


def tensors(v: Any) -> Iterator[torch.Tensor]:
    """The tensors in ``v`` (a tensor, or lists, tuples and mappings of them), depth first."""
    if isinstance(v, torch.Tensor):
        yield v
    elif isinstance(v, (list, tuple)):
        for x in v:
            yield from tensors(x)
    elif isinstance(v, Mapping):
        for x in v.values():
            yield from tensors(x)


def _first_tensor(v: Any) -> torch.Tensor | None:
    return next(tensors(v), None)


def _convert(v: Any, device: torch.device | None, float_dtype: torch.dtype | None) -> Any:
    if isinstance(v, torch.Tensor):
        return v if device is None else v.to(device)
    if isinstance(v, np.ndarray):
        if v.dtype == object:
            raise BadInputError("a calibration batch holds a numpy array of Python objects; give numeric arrays")
        t = torch.from_numpy(np.ascontiguousarray(v))
        if float_dtype is not None and t.is_floating_point():
            t = t.to(float_dtype)
        return t if device is None else t.to(device)
    if isinstance(v, (list, tuple)):
        items = [_convert(x, device, float_dtype) for x in v]
        return items if isinstance(v, list) else tuple(items)
    if isinstance(v, Mapping):
        return {k: _convert(x, device, float_dtype) for k, x in v.items()}
    return v


def as_batch(item: Any, device: torch.device | None = None, float_dtype: torch.dtype | None = None) -> Batch:
    """One data item as a :class:`Batch` (see the module docstring for the accepted forms)."""
    if isinstance(item, (torch.Tensor, np.ndarray)):
        return Batch(args=(_convert(item, device, float_dtype),))
    if isinstance(item, Mapping):
        bad = [k for k in item if not isinstance(k, str)]
        if bad:
            raise BadInputError(f"a calibration batch mapping has non-string key(s) {bad[:3]}; "
                                "mapping batches are passed as keyword arguments")
        return Batch(kwargs={k: _convert(v, device, float_dtype) for k, v in item.items()})
    if isinstance(item, (tuple, list)):
        return Batch(args=tuple(_convert(v, device, float_dtype) for v in item))
    raise BadInputError(
        f"a calibration batch is a {type(item).__name__}; give tensors, numpy arrays, tuples/lists of them "
        "(positional inputs) or dicts (keyword inputs)"
    )


def _single(data: Any) -> bool:
    return isinstance(data, (torch.Tensor, np.ndarray, Mapping))


def count_batches(data: Any) -> int | None:
    """The number of batches ``data`` will yield, when it says so (``len``); else None."""
    if _single(data):
        return 1
    try:
        return len(data)
    except TypeError:
        return None


def iter_batches(data: Any, device: torch.device | None = None,
                 float_dtype: torch.dtype | None = None) -> Iterator[Batch]:
    """Yield :class:`Batch` objects from ``data`` (an iterable of batches, or one batch)."""
    if data is None:
        raise BadInputError("no calibration data given")
    if _single(data):
        yield as_batch(data, device, float_dtype)
        return
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise BadInputError(
            f"calibration data of type {type(data).__name__} is not an iterable of batches; give a list, "
            "a generator or a DataLoader of tensors, tuples or dicts"
        )
    for item in data:
        yield as_batch(item, device, float_dtype)


def check_arity(module: torch.nn.Module, batch: Batch) -> None:
    """Refuse a batch with more positional items than ``module.forward`` accepts.

    The usual cause is a DataLoader of ``(input, target)`` pairs fed to a one-input model: say so
    instead of letting forward fail with a TypeError deep inside.
    """
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):  # builtins, C extensions
        return
    params = list(sig.parameters.values())
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(batch.args) > len(positional):
        raise BadInputError(
            f"a calibration batch has {len(batch.args)} positional items but {type(module).__name__}.forward "
            f"takes {len(positional)}; if the data yields (input, target) pairs, pass the inputs only, "
            "e.g. (x for x, *_ in loader)"
        )
