"""verification/feeds.py: the verification inputs of ``fold`` (fold_feeds) and of ``bnfold verify``."""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
from conftest import make_model, vi
from onnx import TensorProto, helper

from bnfold.data.sources import from_arrays
from bnfold.onnx.runtime import input_specs
from bnfold.verification.feeds import fixed_batch, fold_feeds, random_feeds


def _identity(shape: list[Any], elem: int | None = None) -> onnx.ModelProto:
    kw: dict[str, int] = {} if elem is None else {"elem": elem}
    return make_model([helper.make_node("Identity", ["x"], ["y"])], [vi("x", shape, **kw)], [vi("y", shape, **kw)])


def test_fold_feeds_are_standard_normal_from_seed_0_in_batches_of_one() -> None:
    feeds = fold_feeds(None, _identity(["n", 3, 4]), 3)
    rng = np.random.default_rng(0)
    assert isinstance(feeds, list) and len(feeds) == 3
    for feed in feeds:
        assert list(feed) == ["x"] and feed["x"].dtype == np.float32 and feed["x"].shape == (1, 3, 4)
        np.testing.assert_array_equal(feed["x"], rng.standard_normal((1, 3, 4)).astype(np.float32))


def test_fold_feeds_use_the_fixed_batch_size() -> None:
    model = _identity([2, 5])
    assert fixed_batch(input_specs(model)) == 2
    feeds = fold_feeds(None, model, 2)
    assert isinstance(feeds, list)
    assert [f["x"].shape for f in feeds] == [(2, 5), (2, 5)]


def test_fold_feeds_take_whole_batches_of_calibration_samples() -> None:
    model = _identity([2, 3])
    x = np.arange(21, dtype=np.float32).reshape(7, 3)
    data = from_arrays({"x": x}, input_specs(model), 2)
    feeds = fold_feeds(data, model, 3)  # 3 batches of 2 samples from the first 6
    assert isinstance(feeds, list) and len(feeds) == 3
    np.testing.assert_array_equal(np.concatenate([f["x"] for f in feeds]), x[:6])
    few = from_arrays({"x": x[:1]}, input_specs(model), 2)
    assert fold_feeds(few, model, 3) == "fewer calibration samples (1) than the model's fixed batch size 2"


@pytest.mark.parametrize(("shape", "elem", "why"), [
    (["n", "c"], None, "input 'x' has dynamic dimensions; pass the data argument to verify"),
    # integer inputs are generated now (tests/test_input_shapes.py); a string input still has no values
    (["n", 3], TensorProto.STRING, "input 'x' has dtype object; pass the data argument to verify"),
])
def test_fold_feeds_say_why_there_are_none(shape: list[Any], elem: int | None, why: str) -> None:
    assert fold_feeds(None, _identity(shape, elem), 2) == why


def test_random_feeds_are_seeded_uniform_in_the_range() -> None:
    specs = input_specs(_identity(["n", 4]))
    feeds, info = random_feeds(specs, seed=5, val_range=(-2.0, 3.0), iterations=2, batch_size=3)
    rng = np.random.default_rng(5)
    for feed in feeds:
        np.testing.assert_array_equal(feed["x"], rng.uniform(-2.0, 3.0, size=(3, 4)).astype(np.float32))
    assert info == {"source": "random", "seed": 5, "val_range": [-2.0, 3.0], "iterations": 2, "batch_size": 3}


def test_scalar_inputs_are_fed_as_scalars() -> None:
    """A rank-0 input is a scalar, not a batch: both generators make a 0-d array (review 25m: fed
    as (batch,), it failed to broadcast against a fixed batch; tests/test_review25m_scalar_inputs.py)."""
    specs = input_specs(_identity([]))
    feeds, _ = random_feeds(specs, seed=0, val_range=(0.0, 1.0), iterations=1, batch_size=4)
    assert feeds[0]["x"].shape == ()
    normal = fold_feeds(None, _identity([]), 1)
    assert isinstance(normal, list) and normal[0]["x"].shape == ()
