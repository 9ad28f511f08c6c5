"""A BN whose scale, bias or mean holds NaN or Inf is corrupt, as one with a NaN variance is: one
line (exit 3), nothing written, on every route that plans (fold, --dry-run, inspect). Before, the
variance was checked and the rest was not: the fold's cast check then kept the BN with
DTYPE_OVERFLOW ("would overflow the weight dtype"), a wrong reason, and exit 0 (review 24a)."""
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
SLOTS = {"scale": 1, "bias": 2, "mean": 3}


def _conv_bn(params: dict[str, np.ndarray], *, graph_input: str | None = None) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [init("W", rng.standard_normal((C, 3, 3, 3)).astype(np.float32))]
    inits += [init(f"bn_{k}", v.astype(np.float32)) for k, v in params.items()]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["y"],
                              name="bn")]
    inputs = [vi("x", [2, 3, 6, 6])]
    if graph_input is not None:  # an overridable initializer: not a constant, so not judged
        inputs.append(vi(f"bn_{graph_input}", [C]))
    return make_model(nodes, inputs, [vi("y", 4)], inits, opset=15)


def _params(**bad: float) -> dict[str, np.ndarray]:
    p = {"scale": np.array([1.0, 0.5, 2.0, 1.5]), "bias": np.array([0.0, 0.1, -0.2, 0.3]),
         "mean": np.array([0.1, -0.1, 0.0, 0.2]), "var": np.array([1.0, 0.5, 2.0, 1.5])}
    for k, v in bad.items():
        p[k] = p[k].copy()
        p[k][1] = v
    return p


@pytest.mark.parametrize("what", ["scale", "bias", "mean"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_bn_parameter_is_one_line_of_bad_input(tmp_path, what: str, value: float) -> None:
    path, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(_conv_bn(_params(**{what: value})), path)
    before = path.read_bytes()
    for args in (["fold", path, "-o", out], ["fold", path, "--dry-run"], ["inspect", path]):
        r = run_cli(*args)
        assert r.returncode == 3, (args, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and f"NaN or infinite {what} in channel(s) 1" in lines[0] and "'bn'" in lines[0], lines
        assert "Traceback" not in r.stderr and "DTYPE_OVERFLOW" not in r.stdout
    assert not out.exists() and path.read_bytes() == before
    with pytest.raises(BadInputError, match=f"infinite {what}"):
        fold(onnx.load(path), dry_run=True)


def test_finite_parameters_and_non_constant_ones_still_fold(tmp_path) -> None:
    ok = fold(_conv_bn(_params()), dry_run=True)
    assert [b.action.value for b in ok.report.bns] == ["folded"]
    # a NaN in an initializer that is also a graph input: its value is the caller's, not judged here
    kept = fold(_conv_bn(_params(mean=np.nan), graph_input="mean"), dry_run=True)
    assert [b.reason.value for b in kept.report.bns] == ["NOT_CONSTANT"]


@pytest.mark.parametrize("attr", ["weight", "bias", "running_mean"])
def test_torch_bn_with_a_non_finite_value_is_bad_input_not_dtype_overflow(attr: str) -> None:
    torch = pytest.importorskip("torch")
    from torch import nn

    import bnfold.torch

    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        getattr(m[1], attr)[2] = float("inf")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(BadInputError, match=r"BN '1' has unusable statistics or parameters: .* channel\(s\) \[2\]"):
        bnfold.torch.fold(m, example_inputs=(torch.randn(2, 3, 8, 8),))
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    if attr == "running_mean":  # stored statistics re-estimated from data replace the corrupt ones
        data = [torch.randn(4, 3, 8, 8) for _ in range(3)]
        done = bnfold.torch.fold(m, data, recalibrate="all")
        assert [b.action.value for b in done.report.bns] == ["folded"]
