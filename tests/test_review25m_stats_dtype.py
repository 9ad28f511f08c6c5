"""Review 25m: opset 15 lets a BN keep float32 mean/var (T2) beside a float16 scale/B (T1), as
mixed-precision converters write it. A training-mode BN of that kind was calibrated and frozen
with statistics in the scale's float16: a batch variance above 65504 overflowed ("activations
became non-finite") and smaller statistics were rounded to float16. They keep the mean's type."""
from __future__ import annotations

import numpy as np
import onnx
from conftest import init, make_model, vi
from onnx import TensorProto, helper

from bnfold.api import fold
from bnfold.records import Action

C = 4


def _model(weight_scale: float) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [init("W", (rng.standard_normal((C, 3, 3, 3)) * weight_scale).astype(np.float32)),
             init("s", np.ones(C, np.float16)), init("b", np.zeros(C, np.float16)),
             init("m", np.zeros(C, np.float32)), init("v", np.ones(C, np.float32))]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y", "rm", "rv"], name="bn",
                              training_mode=1)]
    return make_model(nodes, [vi("x", [2, 3, 6, 6])], [vi("y", 4)], inits, opset=15)


def _frozen_stats(path):
    return {t.name: t for t in onnx.load(path).graph.initializer if "frozen" in t.name}


def test_float32_stats_beside_float16_scale_stay_float32(tmp_path):
    rng = np.random.default_rng(1)
    data = {"x": rng.standard_normal((16, 3, 6, 6)).astype(np.float32)}
    res = fold(_model(300.0), data=data, output=tmp_path / "o.onnx", frozen_output=tmp_path / "f.onnx")
    assert res.rows[0].decision.action is Action.FOLDED
    assert res.report.verification.passed
    stats = _frozen_stats(tmp_path / "f.onnx")
    assert stats and all(t.data_type == TensorProto.FLOAT for t in stats.values())
    var = onnx.numpy_helper.to_array(stats["bn.frozen_var"])
    assert np.isfinite(var).all() and var.max() > 65504


def test_small_stats_not_rounded_to_float16(tmp_path):
    rng = np.random.default_rng(2)
    data = {"x": rng.standard_normal((16, 3, 6, 6)).astype(np.float32)}
    fold(_model(1e-3), data=data, output=tmp_path / "o.onnx", frozen_output=tmp_path / "f.onnx")
    stats = _frozen_stats(tmp_path / "f.onnx")
    assert all(t.data_type == TensorProto.FLOAT for t in stats.values())
