"""Inputs for verification, the one place that makes them.

- ``bnfold verify``: :func:`data_feeds` (the first batches of a data file) or :func:`random_feeds`
  (seeded uniform values in ``--val-range``);
- ``fold``: :func:`fold_feeds` (the first calibration samples for the inputs the data supplies,
  standard-normal values from seed 0 for the others), every input at its declared shape: a
  static first dim is the input's own, only a symbolic one is the batch.

Both generators take ``shapes`` (full shapes, batch included) for inputs whose declared shape has
dynamic dims: ``bnfold.verification.shapes`` chooses them (given, hinted or probed). Integer inputs
that ``fold`` generates are drawn from ``{0, ..., hi}``: ``hi`` is one less than the smallest axis a
``Gather`` indexes with the input (an embedding table's rows), else 1 (see :func:`index_bounds`).
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx

from bnfold.data.sources import Batches, open_data
from bnfold.errors import BadInputError
from bnfold.onnx.runtime import input_specs
from bnfold.records import InputSpec
from bnfold.verification.shapes import ShapeChoice, check_given, choose_shapes, reference_runner

__all__ = ["data_feeds", "fixed_batch", "fold_batch", "fold_feeds", "fold_verification_feeds", "index_bounds",
           "random_feeds", "random_verification_feeds", "supplied_names"]

Shapes = Mapping[str, tuple[int, ...]]


def random_feeds(specs: list[InputSpec], *, seed: int, val_range: tuple[float, float], iterations: int,
                 batch_size: int, shapes: Shapes | None = None) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
    """``iterations`` batches of uniform values in ``[lo, hi)`` (integers: ``[lo, hi]``); an input
    in ``shapes`` is made at that shape."""
    lo, hi = val_range
    if not lo <= hi:
        raise BadInputError(f"val_range=({lo}, {hi}): LO must not exceed HI; give (LO, HI) with LO <= HI")
    rng = np.random.default_rng(seed)
    feeds: list[dict[str, np.ndarray]] = []
    for _ in range(iterations):
        feed: dict[str, np.ndarray] = {}
        for spec in specs:
            shape = _shape(spec, batch_size, shapes)
            if shape is None:
                raise BadInputError(
                    f"input '{spec.name}' has dynamic dimensions {_fmt(spec.shape)}; "
                    "random inputs need static shapes: pass the data argument instead")
            _require_memory(spec.name, shape)
            if spec.dtype.kind == "f":
                feed[spec.name] = rng.uniform(lo, hi, size=shape).astype(spec.dtype)
            elif spec.dtype.kind in "iu":
                feed[spec.name] = rng.integers(int(np.ceil(lo)), int(np.floor(hi)), size=shape,
                                               endpoint=True).astype(spec.dtype)
            elif spec.dtype.kind == "b":
                feed[spec.name] = np.asarray(rng.random(size=shape) < 0.5)  # an array also at shape ()
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


def _shape(spec: InputSpec, bs: int, shapes: Shapes | None) -> tuple[int, ...] | None:
    """The shape ``spec`` is fed at: ``shapes``' entry, else the declared one with a symbolic first
    dim as ``bs`` (a declared scalar stays a scalar: it has no batch axis), or None when a
    non-batch dim is dynamic."""
    if shapes is not None and spec.name in shapes:
        return tuple(shapes[spec.name])
    if spec.shape is not None and not spec.shape:
        return ()
    dims = _static_dims(spec)
    if dims is None:
        return None
    first = spec.shape[0] if spec.shape else None
    return (first if first is not None else bs,) + dims


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


def supplied_names(data: Batches | None) -> set[str]:
    """The inputs ``data`` supplies (one sample read to learn them)."""
    return set(data.take(1).keys()) if data is not None else set()


def fold_batch(data: Batches | None, specs: list[InputSpec]) -> int:
    """``fold``'s verification batch: the fixed batch size of the inputs the data supplies (of all
    inputs without data), 1 when they fix none."""
    supplied = supplied_names(data)
    return fixed_batch([s for s in specs if data is None or s.name in supplied]) or 1


def index_bounds(model: onnx.ModelProto) -> dict[str, int]:
    """For integer inputs that index a constant with ``Gather`` (an embedding lookup): the largest
    valid index, the smallest such axis length minus one."""
    consts = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = tuple(node.attribute[0].t.dims)
    ints = {s.name for s in input_specs(model) if s.dtype.kind in "iu"}
    bounds: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type != "Gather" or len(node.input) < 2 or node.input[1] not in ints:
            continue
        dims = consts.get(node.input[0])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if dims and -len(dims) <= axis < len(dims) and dims[axis] > 0:
            name = node.input[1]
            bounds[name] = min(bounds.get(name, dims[axis] - 1), dims[axis] - 1)
    return bounds


def fold_feeds(data: Batches | None, model: onnx.ModelProto, count: int, shapes: Shapes | None = None
               ) -> list[dict[str, np.ndarray]] | str:
    """``fold``'s verification feeds, or a string saying why there are none.

    The inputs ``data`` supplies: the first ``count`` batches' worth of calibration samples, in
    batches of the fixed batch size of those inputs (1 when they fix none; whole batches only).
    Every other input gets standard-normal values (``numpy.random.default_rng(0)``) at its declared
    shape, as ``bnfold verify`` feeds them: a static first dim is the input's own (``s[4,1,1]`` is
    fed as (4, 1, 1), not given a batch axis), a symbolic one is the batch; without data the batch
    is the fixed batch size of all inputs (1 when they fix none), and ``count`` batches are made.
    An input in ``shapes`` is made at that shape (``bnfold.verification.shapes`` chooses them for
    inputs with dynamic dims, which have none otherwise). Integer inputs: uniform integers in
    ``{0, ..., index_bounds(model).get(name, 1)}``; booleans: fair coins.
    """
    specs = input_specs(model)
    rng = np.random.default_rng(0)
    bounds = index_bounds(model)
    if data is None:
        bs = fixed_batch(specs) or 1
        feeds: list[dict[str, np.ndarray]] = []
        for _ in range(count):
            feed = _generated(specs, bs, rng, shapes, bounds)
            if isinstance(feed, str):
                return feed
            feeds.append(feed)
        return feeds
    supplied = supplied_names(data)
    bs = fixed_batch([s for s in specs if s.name in supplied]) or 1
    taken = data.take(count * bs)
    n = next(iter(taken.values())).shape[0]
    if n < bs:
        return f"fewer calibration samples ({n}) than the model's fixed batch size {bs}"
    free = [s for s in specs if s.name not in taken]
    feeds = []
    for i in range(0, n - bs + 1, bs):
        extra = _generated(free, bs, rng, shapes, bounds)
        if isinstance(extra, str):
            return extra
        feeds.append({**{name: arr[i:i + bs] for name, arr in taken.items()}, **extra})
    return feeds


def _generated(specs: list[InputSpec], bs: int, rng: np.random.Generator, shapes: Shapes | None,
               bounds: Mapping[str, int]) -> dict[str, np.ndarray] | str:
    """Standard-normal values for ``specs`` at their declared shapes (a symbolic first dim: ``bs``)
    or at ``shapes``, or why there are none."""
    feed: dict[str, np.ndarray] = {}
    for spec in specs:
        shape = _shape(spec, bs, shapes)
        if shape is None:
            return f"input '{spec.name}' has dynamic dimensions; pass the data argument to verify"
        _require_memory(spec.name, shape)
        if spec.dtype.kind == "f":
            feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype.kind in "iu":
            feed[spec.name] = rng.integers(0, bounds.get(spec.name, 1), size=shape, endpoint=True).astype(spec.dtype)
        elif spec.dtype.kind == "b":
            feed[spec.name] = np.asarray(rng.random(size=shape) < 0.5)  # an array also at shape ()
        else:
            return f"input '{spec.name}' has dtype {spec.dtype}; pass the data argument to verify"
    return feed


def fold_verification_feeds(data: Batches | None, model: onnx.ModelProto, count: int, reference: str | os.PathLike[str],
                            given: Mapping[str, tuple[int, ...]]) -> tuple[list[dict[str, np.ndarray]], ShapeChoice]:
    """``fold``'s feeds (:func:`fold_feeds`) with the inputs it generates at shapes chosen by
    ``bnfold.verification.shapes`` (``given``, the model's hints, or a probe that the ``reference``
    file runs at). Raises :class:`BadInputError` where no feeds can be made: ``fold`` writes an
    unverified model only when told not to verify."""
    specs = input_specs(model)
    check_given(specs, given)
    supplied = supplied_names(data)
    from_data = sorted(n for n in given if n in supplied)
    if from_data:
        raise BadInputError(f"input '{from_data[0]}' is fed from the data, at the data's shape; give input shapes "
                            "only for the inputs the data does not supply")
    free = [s for s in specs if s.name not in supplied]

    def one(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray] | str:
        feeds = fold_feeds(data, model, 1, shapes)
        return feeds if isinstance(feeds, str) else feeds[0]

    choice = choose_shapes(model, free, given=given, batch=fold_batch(data, specs),
                           run=reference_runner(os.fspath(reference), one))
    feeds = fold_feeds(data, model, count, choice.shapes)
    if isinstance(feeds, str):
        raise BadInputError(f"cannot verify the folded model: {feeds} (or verify=False to write it unverified)")
    return feeds, choice


def random_verification_feeds(reference: str | os.PathLike[str], model: onnx.ModelProto, *, seed: int,
                              val_range: tuple[float, float], iterations: int, batch_size: int,
                              given: Mapping[str, tuple[int, ...]]
                              ) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
    """``verify``'s random feeds (:func:`random_feeds`) with inputs that have dynamic dims at shapes
    chosen by ``bnfold.verification.shapes``; the info records them under ``shapes``."""
    specs = input_specs(model)
    check_given(specs, given)

    def one(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray] | str:
        try:
            return random_feeds(specs, seed=seed, val_range=val_range, iterations=1, batch_size=batch_size,
                                shapes=shapes)[0][0]
        except BadInputError as exc:
            return str(exc)

    choice = choose_shapes(model, specs, given=given, batch=batch_size, run=reference_runner(os.fspath(reference), one))
    feeds, info = random_feeds(specs, seed=seed, val_range=val_range, iterations=iterations, batch_size=batch_size,
                               shapes=choice.shapes)
    return feeds, dict(info, shapes=choice.record())
