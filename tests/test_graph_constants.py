"""bnfold.graph.constants: raw tensor reads and writes against onnx's own numpy_helper."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from bnfold.graph.constants import array_to_tensor, raw_values, tensor_to_array


def _inits(**arrays) -> dict[str, onnx.TensorProto]:
    return {k: numpy_helper.from_array(v, k) for k, v in arrays.items()}


def test_raw_values_concatenates_in_the_given_order():
    rng = np.random.default_rng(0)
    a, b, c = (rng.standard_normal(n).astype(np.float32) for n in (3, 1, 5))
    inits = _inits(a=a, b=b, c=c)
    flat, counts = raw_values(inits, ["c", "a", "b", "a"], rank=1)
    np.testing.assert_array_equal(flat, np.concatenate([c, a, b, a]))
    assert counts == [5, 3, 1, 3] and flat.dtype == np.float32
    w = rng.standard_normal((2, 3, 1, 1)).astype(np.float16)
    flat, counts = raw_values(_inits(w=w), ["w"])
    np.testing.assert_array_equal(flat, w.reshape(-1))
    assert counts == [6]


@pytest.mark.parametrize("case", ["missing", "mixed_dtypes", "integer", "not_raw", "external", "rank",
                                  "wrong_length", "empty"])
def test_raw_values_refuses_what_it_cannot_read_as_one_array(case):
    f = np.ones(3, np.float32)
    inits = _inits(a=f, b=f.copy())
    names = ["a", "b"]
    if case == "missing":
        names = ["a", "nope"]
    elif case == "mixed_dtypes":
        inits["b"] = numpy_helper.from_array(np.ones(3, np.float64), "b")
    elif case == "integer":
        inits = _inits(a=np.ones(3, np.int64), b=np.ones(3, np.int64))
    elif case == "not_raw":  # float_data instead of raw bytes
        inits["b"] = onnx.helper.make_tensor("b", onnx.TensorProto.FLOAT, [3], [1.0, 1.0, 1.0], raw=False)
    elif case == "external":
        inits["b"].data_location = onnx.TensorProto.EXTERNAL
    elif case == "rank":
        inits["b"] = numpy_helper.from_array(np.ones((1, 3), np.float32), "b")
    elif case == "wrong_length":  # dims say 4, bytes hold 3 values
        del inits["b"].dims[:]
        inits["b"].dims.append(4)
    else:
        names = []
    assert raw_values(inits, names, rank=1) is None


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_array_to_tensor_round_trip_new_and_in_place(dtype):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((4, 2, 3)).astype(dtype)
    t = array_to_tensor(a, "w")
    np.testing.assert_array_equal(numpy_helper.to_array(t), a)
    np.testing.assert_array_equal(tensor_to_array(t), a)
    b = (a * 2).astype(dtype)
    same = array_to_tensor(b, "w", into=t)
    assert same is t
    np.testing.assert_array_equal(numpy_helper.to_array(t), b)
    c = rng.standard_normal(5).astype(dtype)  # another shape: the tensor is rewritten
    array_to_tensor(c, "w", into=t)
    assert list(t.dims) == [5]
    np.testing.assert_array_equal(numpy_helper.to_array(t), c)
