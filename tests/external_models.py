"""A small model with its weight in an external-data file, and a run of it: the fixture of the
output-handling tests (tests/test_cli_output_transaction.py, tests/test_outputs_hostile.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper


def conv_bn_external(folder: Path, c: int = 32, seed: int = 0, name: str = "m.onnx") -> Path:
    """x (N,3,8,8) -> Conv (c filters; 32: 3.4 KB, stored in '<name>.data') -> BN -> y, saved in ``folder``."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (c, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(1, 0.1, c).astype(np.float32), "s"),
             numpy_helper.from_array(rng.normal(0, 0.1, c).astype(np.float32), "b"),
             numpy_helper.from_array(rng.normal(0, 0.1, c).astype(np.float32), "m"),
             numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(np.float32), "v")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1] * 4),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"], name="bn")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", c, 8, 8])], inits)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path,
              save_as_external_data=True, location=f"{name}.data", size_threshold=1024)
    return path


def run_on_fixed_input(path: Path) -> np.ndarray:
    """The model's output on one fixed (2, 3, 8, 8) input, in onnxruntime."""
    x = np.random.default_rng(1).normal(size=(2, 3, 8, 8)).astype(np.float32)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
