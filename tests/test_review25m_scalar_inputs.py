"""Review 25m: a model input declared as a scalar (rank 0: a keras learning-phase flag, an If
condition, a scale factor) was fed with a batch axis, (batch,), in verification: with a fixed
batch of 2 onnxruntime failed to broadcast it ("cannot run the reference model") and a bool came
as a numpy scalar onnxruntime cannot take. A declared scalar is fed as a 0-d array."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from cli_run import run_cli
from conftest import init, make_model, vi
from onnx import TensorProto, helper

from bnfold.api import fold

C = 4


def _model(elem: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [init("W", rng.standard_normal((C, 3, 3, 3)).astype(np.float32)),
             init("s", np.ones(C, np.float32)), init("b", np.zeros(C, np.float32)),
             init("m", np.zeros(C, np.float32)), init("v", np.ones(C, np.float32))]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["n"], name="bn"),
             helper.make_node("Cast", ["k"], ["kf"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Mul", ["n", "kf"], ["y"], name="mul")]
    return make_model(nodes, [vi("x", [2, 3, 6, 6]), vi("k", [], elem)], [vi("y", [2, C, 4, 4])], inits)


@pytest.mark.parametrize("elem", [TensorProto.BOOL, TensorProto.FLOAT, TensorProto.INT64])
def test_scalar_input_is_fed_as_a_scalar(tmp_path, elem):
    res = fold(_model(elem), output=tmp_path / "o.onnx")
    assert res.report.verification.passed
    assert [n.op_type for n in onnx.load(tmp_path / "o.onnx").graph.node] == ["Conv", "Cast", "Mul"]


def test_cli_verify_with_a_scalar_bool_input(tmp_path):
    m = _model(TensorProto.BOOL)
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    out = tmp_path / "o.onnx"
    r = run_cli("fold", path, "-o", out)
    assert r.returncode == 0, r.stderr
    r = run_cli("verify", path, out)
    assert r.returncode == 0, r.stderr
