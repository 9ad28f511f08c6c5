"""A Conv whose weight is dequantized at run time (a QDQ model: int8 initializer ->
DequantizeLinear -> Conv) keeps its BN with NOT_CONSTANT, and the reason says why: the weight is
quantized, fold before quantizing (review 25m: it said only "is not a constant"). The folded
model (nothing folded) still equals the original under onnxruntime."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from cli_run import run_cli
from conftest import ort_run
from onnx import TensorProto, helper, numpy_helper


def _qdq_model(path: Path, *, through_identity: bool) -> Path:
    rng = np.random.default_rng(0)
    c = 4
    wq = rng.integers(-100, 100, (c, 3, 3, 3)).astype(np.int8)
    inits = [
        numpy_helper.from_array(wq, "w_q"),
        numpy_helper.from_array(np.array(0.01, np.float32), "w_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "w_zero"),
        numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(np.float32), "s"),
        numpy_helper.from_array(rng.normal(0, 1, c).astype(np.float32), "b"),
        numpy_helper.from_array(rng.normal(0, 1, c).astype(np.float32), "m"),
        numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(np.float32), "v"),
    ]
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w_dq"], name="dq_w")]
    weight = "w_dq"
    if through_identity:
        nodes.append(helper.make_node("Identity", ["w_dq"], ["w_id"], name="id_w"))
        weight = "w_id"
    nodes += [
        helper.make_node("Conv", ["x", weight], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"], name="bn"),
    ]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_quantized_weight_reason_names_the_dequantize(tmp_path: Path) -> None:
    for through_identity in (False, True):
        model = _qdq_model(tmp_path / f"qdq{through_identity}.onnx", through_identity=through_identity)
        out, report = tmp_path / "o.onnx", tmp_path / "r.json"
        proc = run_cli("fold", model, "-o", out, "--report", report)
        assert proc.returncode == 0, proc.stderr
        (bn,) = json.loads(report.read_text(encoding="utf-8"))["bns"]
        assert bn["action"] != "folded" and bn["reason"] == "NOT_CONSTANT"
        assert "DequantizeLinear 'dq_w'" in bn["detail"] and "fold the BNs before quantizing" in bn["detail"], bn
        x = np.random.default_rng(1).normal(size=(2, 3, 8, 8)).astype(np.float32)
        np.testing.assert_allclose(ort_run(out, {"x": x})[0], ort_run(model, {"x": x})[0], rtol=1e-6, atol=1e-6)
