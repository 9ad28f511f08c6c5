"""Review 25m (converter-style ONNX graphs): a BN whose scale/B/mean/var is not a (C,) vector
(a scalar from a Constant node's value_float, a (1,) initializer, a length that disagrees with
the others) is bad input: one line naming the BN and the parameter, exit code 3, nothing written;
not an internal ValueError from the fold arithmetic."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from cli_run import run_cli
from conftest import init, make_model, vi
from onnx import helper

from bnfold.api import fold
from bnfold.errors import BadInputError

C = 4
_PARAMS = {"s": "scale", "b": "B", "m": "mean", "v": "var"}


def _model(which: str, kind: str) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [init("W", rng.standard_normal((C, 3, 3, 3)).astype(np.float32)),
             init("s", np.ones(C, np.float32)), init("b", np.zeros(C, np.float32)),
             init("m", np.zeros(C, np.float32)), init("v", np.ones(C, np.float32))]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv")]
    if kind == "value_float":
        nodes.insert(0, helper.make_node("Constant", [], ["k"], value_float=1.5, name="k_const"))
    else:
        inits.append(init("k", np.full((1,) if kind == "len1" else (), 1.5, np.float32)))
    ins = ["c"] + [("k" if p == which else p) for p in "sbmv"]
    nodes.append(helper.make_node("BatchNormalization", ins, ["y"], name="bn"))
    return make_model(nodes, [vi("x", [2, 3, 6, 6])], [vi("y", 4)], inits, opset=13, check=False)


@pytest.mark.parametrize("which", list(_PARAMS))
@pytest.mark.parametrize("kind", ["value_float", "scalar", "len1"])
def test_bad_bn_parameter_shape_is_one_line_bad_input(tmp_path, which, kind):
    m = _model(which, kind)
    with pytest.raises(BadInputError) as exc:
        fold(m, dry_run=True)
    msg = str(exc.value)
    assert "'bn'" in msg and _PARAMS[which] in msg and "(C,)" in msg, msg
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    out = tmp_path / "o.onnx"
    for args in (["fold", path, "-o", out], ["inspect", path]):
        r = run_cli(*args)
        assert r.returncode == 3, (args, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "internal error" not in lines[0] and "'bn'" in lines[0], lines
    assert not out.exists()
