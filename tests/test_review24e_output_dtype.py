"""review24e: an integer output of another dtype in the candidate (int32 where the reference has
int64, equal values) fails, as the README says (exact outputs must have the same dtype), but every
report and the one stderr line said only ``max abs diff 0, max rel diff 0`` / ``mismatches 0/4``:
a failure with nothing wrong in it. The provider run's note, the stderr line and the JUnit failure
now say ``output dtypes differ: 'y' is int32 in the candidate, int64 in the reference``."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
from cli_run import run_cli
from onnx import TensorProto, helper, numpy_helper

WHY = "output dtypes differ: 'y' is int32 in the candidate, int64 in the reference"


def _model(path: Path, to: int) -> Path:
    kk = numpy_helper.from_array(np.array(100.0, np.float32), "k")
    g = helper.make_graph([helper.make_node("Mul", ["x", "k"], ["t"]), helper.make_node("Cast", ["t"], ["y"], to=to)],
                          "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", to, [1, 4])], [kk])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    onnx.save(m, path)
    return path


def test_an_output_of_another_dtype_says_so(tmp_path: Path) -> None:
    a, b = _model(tmp_path / "a.onnx", TensorProto.INT64), _model(tmp_path / "b.onnx", TensorProto.INT32)
    res = run_cli("verify", a, b, "--junit-xml", tmp_path / "j.xml", "--summary-md", tmp_path / "s.md", "--no-repro")
    assert res.returncode == 1
    assert WHY in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    failure = ET.parse(tmp_path / "j.xml").getroot().find(".//failure")
    assert failure is not None and WHY in failure.get("message", "")
    assert WHY in (tmp_path / "s.md").read_text(encoding="utf-8")


def test_same_dtype_has_no_dtype_note(tmp_path: Path) -> None:
    a = _model(tmp_path / "a.onnx", TensorProto.INT64)
    res = run_cli("verify", a, a, "--no-repro")
    assert res.returncode == 0 and "dtypes differ" not in res.stdout + res.stderr
