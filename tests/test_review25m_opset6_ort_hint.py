"""Review 25m: an opset-6 model (BatchNormalization with ``consumed_inputs``, as caffe2 and early
converters wrote) folds, but onnxruntime refuses to load opset-6 BN at all; the one-line error
names the cause and the fixes (convert to opset >= 7, or --no-verify), not only onnxruntime's
schema message."""
from __future__ import annotations

import numpy as np
import onnx
from cli_run import run_cli
from conftest import init, make_model, vi
from onnx import helper

C = 4


def _opset6(tmp_path):
    rng = np.random.default_rng(0)
    inits = [init("W", rng.standard_normal((C, 3, 3, 3)).astype(np.float32)),
             init("s", np.ones(C, np.float32)), init("b", np.zeros(C, np.float32)),
             init("m", np.zeros(C, np.float32)), init("v", np.ones(C, np.float32))]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"], name="bn", is_test=1,
                              consumed_inputs=[0, 0, 0, 1, 1])]
    m = make_model(nodes, [vi("x", [2, 3, 6, 6])], [vi("y", 4)], inits, opset=6, ir_version=3, check=False)
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    return path


def test_opset6_verification_error_names_the_fix(tmp_path):
    path = _opset6(tmp_path)
    out = tmp_path / "o.onnx"
    r = run_cli("fold", path, "-o", out)
    assert r.returncode == 3, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "opset 7" in lines[0] and "--no-verify" in lines[0], lines
    assert not out.exists()


def test_opset6_folds_without_verification(tmp_path):
    path = _opset6(tmp_path)
    out = tmp_path / "o.onnx"
    r = run_cli("fold", path, "-o", out, "--no-verify")
    assert r.returncode == 0, r.stderr
    assert [n.op_type for n in onnx.load(out).graph.node] == ["Conv"]
