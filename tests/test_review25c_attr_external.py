"""Hostile review 25c: an external tensor in an attribute of a standard operator outside the few that
take tensors (a Relu with a tensor attribute) escaped the containment check. Before, `inspect`
listed the model (exit 0) and `fold --no-verify` wrote an output that still named the absolute
path; docs/security.md says every tensor attribute's external data follows onnx's rules (exit 3)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_run import run_cli
from onnx import TensorProto, helper, numpy_helper


def _external(name: str, data_type: int, dims: list[int], location: str, length: int) -> TensorProto:
    """A tensor whose data is ``length`` bytes at offset 0 of ``location``."""
    t = TensorProto(name=name, data_type=data_type, dims=dims, data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def _refused(tmp_path: Path, model: Path, command: str) -> None:
    """``inspect`` / ``fold --no-verify`` on ``model``: exit 3, one line about the absolute path, no output."""
    out = tmp_path / "out"
    args = ["inspect", model] if command == "inspect" else ["fold", model, "-o", out / "o.onnx", "--no-verify"]
    proc = run_cli(*args)
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    [line] = proc.stderr.strip().splitlines()
    assert "absolute path" in line, line
    assert not out.exists()


def _model(folder: Path, location: str, as_graph: bool = False) -> Path:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32), "w")]
    inits += [numpy_helper.from_array(rng.uniform(0.5, 2, 4).astype(np.float32), n) for n in "sbmv"]
    evil = _external("evil", TensorProto.UINT8, [4], location, 4)
    relu = helper.make_node("Relu", ["z"], ["y"], name="relu")
    if as_graph:
        sub = helper.make_graph([], "sub", [], [helper.make_tensor_value_info("evil", TensorProto.UINT8, [4])], [evil])
        relu.attribute.append(helper.make_attribute("body", sub))
    else:
        relu.attribute.append(helper.make_attribute("evil_attr", evil))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1] * 4),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["z"], name="bn"), relu]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], inits)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


@pytest.mark.parametrize("as_graph", [False, True])
@pytest.mark.parametrize("command", ["inspect", "fold"])
def test_an_escaping_attribute_tensor_of_any_node_is_exit_3(tmp_path: Path, command: str, as_graph: bool) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"SECRETSECRET")
    model = _model(tmp_path / "in", str(secret), as_graph)
    _refused(tmp_path, model, command)


@pytest.mark.parametrize("command", ["inspect", "fold"])
def test_escaping_indices_of_a_sparse_initializer_are_exit_3(tmp_path: Path, command: str) -> None:
    """Before, only a sparse tensor's values were checked: indices at an absolute path passed."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"SECRETSECRETSECRET")
    model = _model(tmp_path / "in", "unused")
    m = onnx.load(model, load_external_data=False)
    m.graph.node[-1].ClearField("attribute")
    indices = _external("spi", TensorProto.INT64, [2], str(secret), 16)
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(np.ones(2, np.float32), "sp"), indices, [256])
    m.graph.sparse_initializer.append(sparse)
    onnx.save(m, model)
    _refused(tmp_path, model, command)


@pytest.mark.parametrize("command", ["inspect", "fold"])
def test_an_escaping_tensor_in_a_local_function_is_exit_3(tmp_path: Path, command: str) -> None:
    """Before, the Constants of a model-local function were not looked at: inspect and fold
    --no-verify passed a function Constant whose data is at an absolute path (onnxruntime inlines it)."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"SECRETSECRET")
    model = _model(tmp_path / "in", "unused")
    m = onnx.load(model, load_external_data=False)
    m.graph.node[-1].ClearField("attribute")
    evil = _external("evil", TensorProto.FLOAT, [1], str(secret), 4)
    m.functions.append(helper.make_function(
        "local", "AddC", ["a"], ["b"],
        [helper.make_node("Constant", [], ["c"], value=evil), helper.make_node("Add", ["a", "c"], ["b"])],
        [helper.make_opsetid("", 17)]))
    m.opset_import.append(helper.make_opsetid("local", 1))
    m.graph.node[-1].output[0] = "r"
    m.graph.node.append(helper.make_node("AddC", ["r"], ["y"], domain="local"))
    onnx.save(m, model)
    _refused(tmp_path, model, command)
