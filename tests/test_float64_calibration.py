"""A float64 model with a training-mode BN calibrates (issue 15 point 1: onnxruntime has no float64
Conv, so calibration exited 3; the calibration network now runs on onnx's reference evaluator),
with statistics equal to Algorithm 2 computed in numpy, and the fold verifies."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

import bnfold


def _conv3x3(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    h, wd = x.shape[2], x.shape[3]
    out = np.zeros((x.shape[0], w.shape[0], h, wd))
    for i in range(h):
        for j in range(wd):
            out[:, :, i, j] = np.einsum("nchw,ochw->no", xp[:, :, i:i + 3, j:j + 3], w)
    return out


def test_float64_training_bn_calibrates_exactly() -> None:
    rng = np.random.default_rng(0)
    c = 4
    w = rng.normal(0, 0.5, (c, 3, 3, 3))
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(rng.normal(1, 0.1, c), "s"),
             numpy_helper.from_array(rng.normal(0, 0.1, c), "b"), numpy_helper.from_array(np.zeros(c), "m"),
             numpy_helper.from_array(np.ones(c), "v")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["cv"], pads=[1] * 4, name="conv"),
             helper.make_node("BatchNormalization", ["cv", "s", "b", "m", "v"], ["y"], name="bn", training_mode=1)]
    double = onnx.TensorProto.DOUBLE
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", double, ["N", 3, 6, 6])],
                              [helper.make_tensor_value_info("y", double, ["N", c, 6, 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8)
    x = rng.normal(size=(16, 3, 6, 6))
    result = bnfold.fold(model, data={"x": x}, batch_size=4)
    [rec] = result.report.bns
    assert rec.action is bnfold.Action.FOLDED and result.ok
    batches = [_conv3x3(x[k:k + 4], w) for k in range(0, 16, 4)]
    m = 4 * 6 * 6  # values per channel in a batch
    mean = np.mean([b.mean(axis=(0, 2, 3)) for b in batches], axis=0)
    var = m / (m - 1) * np.mean([b.var(axis=(0, 2, 3)) for b in batches], axis=0)  # Algorithm 2
    assert rec.stats is not None
    # float64 end to end: only summation order differs
    np.testing.assert_allclose(rec.stats.mean, mean, rtol=0, atol=1e-12)
    np.testing.assert_allclose(rec.stats.var, var, rtol=1e-12, atol=0)
