"""Issue 17 point 2: a streamed data source gets the files' rules and one-line messages (names,
rank, static dims, dtype, NaN/Inf naming the batch and its sample range), and a source that
yields nothing, yields something else, or raises is a one-line BadInputError."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from test_data_stream import _gen, _model, _x

from bnfold.api import fold
from bnfold.errors import BadInputError


def _fold(model: Any, data: Any, **kw: Any) -> None:
    fold(model, data=data, verify=False, dry_run=True, **kw)


def _raises(model: Any, data: Any, pattern: str, **kw: Any) -> str:
    with pytest.raises(BadInputError, match=pattern) as info:
        _fold(model, data, **kw)
    text = str(info.value)
    assert "\n" not in text
    return text


def test_nan_names_input_batch_and_sample_range(rng: np.random.Generator) -> None:
    model, x = _model(rng), _x(rng)
    x[9, 0, 0, 0] = np.nan
    _raises(model, _gen(x, 4), r"input 'x' has NaN or Inf values in batch 3 \(samples 8\.\.9 of the stream\)")
    x[9, 0, 0, 0] = np.inf
    _raises(model, _gen(x, 3), r"NaN or Inf values in batch 4 \(samples 9\.\.9 of the stream\)", batch_size=4)


def test_source_that_raises_names_the_batch(rng: np.random.Generator) -> None:
    model, x = _model(rng), _x(rng)

    def broken() -> Iterator[dict[str, np.ndarray]]:
        yield {"x": x[:2]}
        yield {"x": x[2:4]}
        raise ValueError("disk went away")

    text = _raises(model, broken(), "calibration data source raised ValueError on batch 3: disk went away")
    assert text.endswith("fix the data source")

    def at_once() -> Iterator[dict[str, np.ndarray]]:
        raise KeyError("first")
        yield {}

    _raises(model, at_once(), "raised KeyError on batch 1")


def test_empty_and_wrong_items(rng: np.random.Generator) -> None:
    model, x = _model(rng), _x(rng)
    _raises(model, iter([]), "yielded no batches")
    _raises(model, [], "yielded no batches")
    _raises(model, [{"x": x[:2]}, 7], "batch 2 is a int; yield dicts of input name -> array")
    _raises(model, ["abc"], "batch 1 is a str")
    _raises(model, [{"x": [[1.0]]}], "input 'x' is a list, not an array")
    _raises(model, [{"x": x[:0]}], "batch 1 has zero samples")
    _raises(model, [{1: x}], "non-string key")


def test_names_rank_dims_dtype_like_files(rng: np.random.Generator) -> None:
    model, x = _model(rng), _x(rng)
    _raises(model, [{"y": x}], "batch 1 has no array for model input 'x'")
    _raises(model, [{"x": x, "extra": x}], r"batch 1 has array\(s\) 'extra' that are not model inputs")
    _raises(model, [{"x": x[:, 0]}], "batch 1 array 'x' has rank 3")
    _raises(model, [{"x": x[:, :2]}], "dim 1 is 2, the model needs 3")
    _raises(model, [{"x": x.astype(np.int32)}], "has dtype int32 but model input 'x' is float32")
    _raises(model, [{"x": x[:4]}, {"x": x[4:, :, :5, :4]}], "dim 2 is 5")
    two = _model(rng, inputs=2)
    _raises(two, [x], "batch 1 is a bare array, but the model has 2 inputs")
    _raises(two, [(x,)], "batch 1 holds 1 arrays but the model has 2 inputs")


def test_float64_data_is_cast_like_files_and_overflow_named(rng: np.random.Generator) -> None:
    model, x = _model(rng), _x(rng)
    _fold(model, [{"x": x.astype(np.float64)}])  # floating data may be any float type (the files' rule)
    big = x.astype(np.float64)
    big[5, 0, 0, 0] = 1e300
    _raises(model, [{"x": big[:4]}, {"x": big[4:]}], r"overflows the model's float32 in batch 2 \(samples 4\.\.9")


def test_string_paths_still_go_to_files(rng: np.random.Generator) -> None:
    model = _model(rng)
    _raises(model, "missing.npz", "'missing.npz' does not exist")
