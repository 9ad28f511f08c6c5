"""Inputs for verification: calibration data, or seeded random values in a range."""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from bnfold.data.sources import open_data
from bnfold.errors import BadInputError
from bnfold.records import InputSpec


def random_feeds(specs: list[InputSpec], *, seed: int, val_range: tuple[float, float], iterations: int,
                 batch_size: int) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
    """``iterations`` batches of uniform values in ``[lo, hi)`` (integers: ``[lo, hi]``)."""
    lo, hi = val_range
    if not lo <= hi:
        raise BadInputError(f"--val-range {lo},{hi}: LO must not exceed HI; give LO,HI with LO <= HI")
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(iterations):
        feed = {}
        for spec in specs:
            if spec.shape is None or any(d is None for d in spec.shape[1:]):
                raise BadInputError(
                    f"input '{spec.name}' has dynamic dimensions {_fmt(spec.shape)}; "
                    "random inputs need static shapes: pass --data instead")
            n = spec.shape[0] if spec.shape and spec.shape[0] is not None else batch_size
            shape = (n,) + tuple(spec.shape[1:])
            if spec.dtype.kind == "f":
                feed[spec.name] = rng.uniform(lo, hi, size=shape).astype(spec.dtype)
            elif spec.dtype.kind in "iu":
                feed[spec.name] = rng.integers(int(np.ceil(lo)), int(np.floor(hi)), size=shape,
                                               endpoint=True).astype(spec.dtype)
            elif spec.dtype.kind == "b":
                feed[spec.name] = rng.random(size=shape) < 0.5
            else:
                raise BadInputError(f"input '{spec.name}' has dtype {spec.dtype}: pass --data instead")
        feeds.append(feed)
    info = {"source": "random", "seed": seed, "val_range": [lo, hi], "iterations": iterations,
            "batch_size": batch_size}
    return feeds, info


def _fmt(shape) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in (shape or ())) + ")"


def data_feeds(path: str | os.PathLike[str], specs: list[InputSpec], *, batch_size: int,
               iterations: int | None) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
    """The first ``iterations`` batches of the data (all of them when None)."""
    fixed = {s.shape[0] for s in specs if s.shape and s.shape[0] is not None}
    if fixed and batch_size not in fixed:
        batch_size = fixed.pop()
    data = open_data(path, specs, batch_size)
    feeds = []
    for k, batch in enumerate(data):
        if iterations is not None and k >= iterations:
            break
        feeds.append(batch)
    info = {"source": "data", "path": os.fspath(path), "batch_size": batch_size, "iterations": len(feeds)}
    return feeds, info
