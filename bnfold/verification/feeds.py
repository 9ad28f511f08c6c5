"""Inputs for verification, the one place that makes them.

- ``bnfold verify``: :func:`data_feeds` (the first batches of a data file) or :func:`random_feeds`
  (seeded uniform values in ``--val-range``);
- ``fold``: :func:`fold_feeds` (the first calibration samples for the inputs the data supplies,
  standard-normal values from seed 0 for the others), every input at its declared shape: a
  static first dim is the input's own, only a symbolic one is the batch.
"""
from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import onnx

from bnfold.data.sources import Batches, open_data
from bnfold.errors import BadInputError
from bnfold.onnx.runtime import input_specs
from bnfold.records import InputSpec

__all__ = ["data_feeds", "fixed_batch", "fold_feeds", "random_feeds"]


def random_feeds(specs: list[InputSpec], *, seed: int, val_range: tuple[float, float], iterations: int,
                 batch_size: int) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
    """``iterations`` batches of uniform values in ``[lo, hi)`` (integers: ``[lo, hi]``)."""
    lo, hi = val_range
    if not lo <= hi:
        raise BadInputError(f"val_range=({lo}, {hi}): LO must not exceed HI; give (LO, HI) with LO <= HI")
    rng = np.random.default_rng(seed)
    feeds: list[dict[str, np.ndarray]] = []
    for _ in range(iterations):
        feed: dict[str, np.ndarray] = {}
        for spec in specs:
            dims = _static_dims(spec)
            if dims is None:
                raise BadInputError(
                    f"input '{spec.name}' has dynamic dimensions {_fmt(spec.shape)}; "
                    "random inputs need static shapes: pass the data argument instead")
            first = spec.shape[0] if spec.shape else None
            n = first if first is not None else batch_size
            shape = (n,) + dims
            _require_memory(spec.name, shape)
            if spec.dtype.kind == "f":
                feed[spec.name] = rng.uniform(lo, hi, size=shape).astype(spec.dtype)
            elif spec.dtype.kind in "iu":
                feed[spec.name] = rng.integers(int(np.ceil(lo)), int(np.floor(hi)), size=shape,
                                               endpoint=True).astype(spec.dtype)
            elif spec.dtype.kind == "b":
                feed[spec.name] = rng.random(size=shape) < 0.5
            else:
                raise BadInputError(f"input '{spec.name}' has dtype {spec.dtype}: pass the data argument instead")
        feeds.append(feed)
    info = {"source": "random", "seed": seed, "val_range": [lo, hi], "iterations": iterations,
            "batch_size": batch_size}
    return feeds, info


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _require_memory(name: str, shape: tuple[int, ...]) -> None:
    """Refuse, before numpy tries, random values for an input whose declared shape does not fit in
    this machine's memory (they are drawn as float64: 8 bytes a value)."""
    need = 8 * math.prod(shape)
    have = _physical_memory()
    if have is not None and need > have:
        raise BadInputError(
            f"input '{name}' declares shape {_fmt(shape)}: {need / 2**30:.3g} GiB of random values per batch, more "
            f"than this machine's {have / 2**30:.3g} GiB of memory (check the model's input shape); pass the data "
            "argument to verify")


def _static_dims(spec: InputSpec) -> tuple[int, ...] | None:
    """The dims after the batch axis, or None when the rank or one of them is unknown."""
    if spec.shape is None:
        return None
    rest = spec.shape[1:]
    dims = tuple(d for d in rest if d is not None)
    return dims if len(dims) == len(rest) else None


def _fmt(shape: tuple[int | None, ...] | None) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in (shape or ())) + ")"


def data_feeds(path: str | os.PathLike[str], specs: list[InputSpec], *, batch_size: int,
               iterations: int | None) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
    """The first ``iterations`` batches of the data (all of them when None)."""
    fixed = {s.shape[0] for s in specs if s.shape and s.shape[0] is not None}
    if fixed and batch_size not in fixed:
        batch_size = fixed.pop()
    data = open_data(path, specs, batch_size)
    feeds: list[dict[str, np.ndarray]] = []
    for k, batch in enumerate(data):
        if iterations is not None and k >= iterations:
            break
        feeds.append(batch)
    info = {"source": "data", "path": os.fspath(path), "batch_size": batch_size, "iterations": len(feeds)}
    return feeds, info


def fixed_batch(specs: list[InputSpec]) -> int | None:
    """The batch size every input fixes on axis 0, if any does."""
    fixed = {s.shape[0] for s in specs if s.shape and s.shape[0] is not None}
    return fixed.pop() if len(fixed) == 1 else None


def fold_feeds(data: Batches | None, model: onnx.ModelProto, count: int
               ) -> list[dict[str, np.ndarray]] | str:
    """``fold``'s verification feeds, or a string saying why there are none.

    The inputs ``data`` supplies: the first ``count`` batches' worth of calibration samples, in
    batches of the fixed batch size of those inputs (1 when they fix none; whole batches only).
    Every other input gets standard-normal values (``numpy.random.default_rng(0)``) at its declared
    shape, as ``bnfold verify`` feeds them: a static first dim is the input's own (``s[4,1,1]`` is
    fed as (4, 1, 1), not given a batch axis), a symbolic one is the batch; without data the batch
    is the fixed batch size of all inputs (1 when they fix none), and ``count`` batches are made.
    Generated inputs need static non-batch dims and a float dtype.
    """
    specs = input_specs(model)
    rng = np.random.default_rng(0)
    if data is None:
        bs = fixed_batch(specs) or 1
        feeds: list[dict[str, np.ndarray]] = []
        for _ in range(count):
            feed = _generated(specs, bs, rng)
            if isinstance(feed, str):
                return feed
            feeds.append(feed)
        return feeds
    supplied = data.take(1).keys()  # the inputs the data supplies (one sample read to learn them)
    bs = fixed_batch([s for s in specs if s.name in supplied]) or 1
    taken = data.take(count * bs)
    n = next(iter(taken.values())).shape[0]
    if n < bs:
        return f"fewer calibration samples ({n}) than the model's fixed batch size {bs}"
    free = [s for s in specs if s.name not in taken]
    feeds = []
    for i in range(0, n - bs + 1, bs):
        extra = _generated(free, bs, rng)
        if isinstance(extra, str):
            return extra
        feeds.append({**{name: arr[i:i + bs] for name, arr in taken.items()}, **extra})
    return feeds


def _generated(specs: list[InputSpec], bs: int, rng: np.random.Generator) -> dict[str, np.ndarray] | str:
    """Standard-normal values for ``specs`` at their declared shapes (a symbolic first dim: ``bs``),
    or why there are none."""
    feed: dict[str, np.ndarray] = {}
    for spec in specs:
        dims = _static_dims(spec)
        if dims is None:
            return f"input '{spec.name}' has dynamic dimensions; pass the data argument to verify"
        first = spec.shape[0] if spec.shape else None  # as ``random_feeds``: rank 0 gets (bs,)
        shape = (first if first is not None else bs,) + dims
        _require_memory(spec.name, shape)
        if spec.dtype.kind == "f":
            feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype.kind in "iu":
            return f"input '{spec.name}' is an integer input; pass the data argument to verify"
        else:
            return f"input '{spec.name}' has dtype {spec.dtype}; pass the data argument to verify"
    return feed
