"""review24e: ``verify`` on two models with different inputs. Different *outputs* are exit 3
("different outputs ...; compare models with the same interface"), but a candidate whose input has
another name ended with ``verification batch 0 lacks model input(s) z; give a value for every model
input`` (a fix the user cannot act on: the random inputs come from the reference), and one whose
input has another dtype with exit 1 "the candidate failed to run" and a repro bundle, as if the
fold were wrong. Both are the same one-line exit 3 now, nothing written."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_run import run_cli
from onnx import TensorProto, helper, numpy_helper


def _model(path: Path, name: str = "x", dtype: int = TensorProto.FLOAT) -> Path:
    nodes = [helper.make_node("Cast", [name], ["c"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["c", "k"], ["y"])]
    kk = numpy_helper.from_array(np.array(1.0, np.float32), "k")
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(name, dtype, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [kk])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    onnx.save(m, path)
    return path


@pytest.mark.parametrize(("name", "dtype", "shown"), [("z", TensorProto.FLOAT, "'z': tensor(float)"),
                                                      ("x", TensorProto.DOUBLE, "'x': tensor(double)")])
def test_different_inputs_are_bad_input(tmp_path: Path, name: str, dtype: int, shown: str) -> None:
    ref, cand = _model(tmp_path / "a.onnx"), _model(tmp_path / "b.onnx", name, dtype)
    out = tmp_path / "out"
    res = run_cli("verify", ref, cand, "--report", out / "r.json", "--repro-dir", out / "repro")
    assert res.returncode == 3, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "different inputs" in lines[0] and shown in lines[0], lines
    assert not out.exists()


def test_same_inputs_still_verify(tmp_path: Path) -> None:
    ref, cand = _model(tmp_path / "a.onnx"), _model(tmp_path / "b.onnx")
    assert run_cli("verify", ref, cand).returncode == 0
