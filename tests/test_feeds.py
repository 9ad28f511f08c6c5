"""verify/feeds.py: the verification inputs of ``fold`` (fold_feeds) and of ``bnfold verify``."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import INT64, make_model, vi
from onnx import helper

from bnfold.data.sources import from_arrays
from bnfold.onnx.runtime import input_specs
from bnfold.verify.feeds import fixed_batch, fold_feeds, random_feeds


def _identity(shape, elem=None):
    kw = {} if elem is None else {"elem": elem}
    return make_model([helper.make_node("Identity", ["x"], ["y"])], [vi("x", shape, **kw)], [vi("y", shape, **kw)])


def test_fold_feeds_are_standard_normal_from_seed_0_in_batches_of_one():
    feeds = fold_feeds(None, _identity(["n", 3, 4]), 3)
    rng = np.random.default_rng(0)
    assert isinstance(feeds, list) and len(feeds) == 3
    for feed in feeds:
        assert list(feed) == ["x"] and feed["x"].dtype == np.float32 and feed["x"].shape == (1, 3, 4)
        np.testing.assert_array_equal(feed["x"], rng.standard_normal((1, 3, 4)).astype(np.float32))


def test_fold_feeds_use_the_fixed_batch_size():
    model = _identity([2, 5])
    assert fixed_batch(input_specs(model)) == 2
    feeds = fold_feeds(None, model, 2)
    assert [f["x"].shape for f in feeds] == [(2, 5), (2, 5)]


def test_fold_feeds_take_whole_batches_of_calibration_samples():
    model = _identity([2, 3])
    x = np.arange(21, dtype=np.float32).reshape(7, 3)
    data = from_arrays({"x": x}, input_specs(model), 2)
    feeds = fold_feeds(data, model, 3)  # 3 batches of 2 samples from the first 6
    assert len(feeds) == 3
    np.testing.assert_array_equal(np.concatenate([f["x"] for f in feeds]), x[:6])
    few = from_arrays({"x": x[:1]}, input_specs(model), 2)
    assert fold_feeds(few, model, 3) == "fewer calibration samples (1) than the model's fixed batch size 2"


@pytest.mark.parametrize(("shape", "elem", "why"), [
    (["n", "c"], None, "input 'x' has dynamic dimensions; pass --data to verify"),
    (["n", 3], INT64, "input 'x' is an integer input; pass --data to verify"),
])
def test_fold_feeds_say_why_there_are_none(shape, elem, why):
    assert fold_feeds(None, _identity(shape, elem), 2) == why


def test_random_feeds_are_seeded_uniform_in_the_range():
    specs = input_specs(_identity(["n", 4]))
    feeds, info = random_feeds(specs, seed=5, val_range=(-2.0, 3.0), iterations=2, batch_size=3)
    rng = np.random.default_rng(5)
    for feed in feeds:
        np.testing.assert_array_equal(feed["x"], rng.uniform(-2.0, 3.0, size=(3, 4)).astype(np.float32))
    assert info == {"source": "random", "seed": 5, "val_range": [-2.0, 3.0], "iterations": 2, "batch_size": 3}
