"""A BatchNorm in training mode written out without a BatchNormalization node (review24f): the
ReduceMean over the batch and spatial axes, Sub, Mul, ReduceMean, Add, Sqrt, Div an exporter may
emit. Its outputs depend on the rest of the batch, and bnfold has no BN node to freeze; it was
left as it was with "0 BN", no warning and exit 0. Every main-graph reduction over axis 0 that no
recognised BN accounts for is now named in a warning (report and summary); the recognised
decomposed pattern (statistics fed to a BatchNormalization node) and reductions over other axes
give none."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_run import run_cli
from conftest import init, make_model, vi
from onnx import helper

from bnfold.api import fold

C = 4


def _written_out_bn(opset: int, axes: list[int], batch: int | str = "N") -> onnx.ModelProto:
    """Conv, then a BN in training mode as plain arithmetic over ``axes``."""
    rng = np.random.default_rng(0)
    mk = helper.make_node
    inits = [init("W", rng.standard_normal((C, 3, 3, 3)).astype(np.float32)), init("eps", np.float32(1e-5)),
             init("g", np.ones((1, C, 1, 1), np.float32)), init("b", np.zeros((1, C, 1, 1), np.float32))]
    if opset >= 18:
        inits.append(init("axes", np.array(axes, np.int64)))
        red = {"inputs": ["axes"], "attrs": {}}
    else:
        red = {"inputs": [], "attrs": {"axes": axes}}
    nodes = [mk("Conv", ["x", "W"], ["c"], name="conv"),
             mk("ReduceMean", ["c", *red["inputs"]], ["mu"], name="mean", keepdims=1, **red["attrs"]),
             mk("Sub", ["c", "mu"], ["d"], name="sub"), mk("Mul", ["d", "d"], ["d2"], name="sq"),
             mk("ReduceMean", ["d2", *red["inputs"]], ["var"], name="var", keepdims=1, **red["attrs"]),
             mk("Add", ["var", "eps"], ["ve"], name="add"), mk("Sqrt", ["ve"], ["sd"], name="sqrt"),
             mk("Div", ["d", "sd"], ["n"], name="div"), mk("Mul", ["n", "g"], ["ng"], name="scale"),
             mk("Add", ["ng", "b"], ["y"], name="shift")]
    return make_model(nodes, [vi("x", [batch, 3, 8, 8])], [vi("y", 4)], inits, opset=opset)


@pytest.mark.parametrize("opset", [13, 18])
def test_a_bn_written_out_without_a_bn_node_is_named_in_a_warning(tmp_path: Path, opset: int) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_written_out_bn(opset, [0, 2, 3]), path)
    res = run_cli("fold", path, "-o", tmp_path / "o.onnx", "--report", tmp_path / "r.json")
    assert res.returncode == 0, res.stderr
    warnings = json.loads((tmp_path / "r.json").read_text())["warnings"]
    assert [w.split(")")[0] for w in warnings if "reduces over the batch axis" in w] == [
        "node 'mean' (ReduceMean over axes [0, 2, 3]", "node 'var' (ReduceMean over axes [0, 2, 3]"]
    assert "reduces over the batch axis" in res.stdout  # the summary's warnings list
    result = fold(onnx.load(path), dry_run=True)  # the API's report too
    assert sum("reduces over the batch axis" in w for w in result.report.warnings) == 2


@pytest.mark.parametrize(("axes", "batch"), [([2, 3], "N"), ([-1], "N"), ([0, 2, 3], 1)])
def test_reductions_that_do_not_mix_samples_give_no_warning(axes: list[int], batch: int | str) -> None:
    # per-sample statistics (instance-norm-like), the last axis, or a fixed batch of one
    result = fold(_written_out_bn(18, axes, batch), dry_run=True)
    assert not [w for w in result.report.warnings if "batch axis" in w]


def test_the_recognised_decomposed_bn_gives_no_warning() -> None:
    # the sample with BatchNormalization nodes fed by ReduceMean statistics (Mode.DECOMPOSED): frozen, not warned
    sample = Path(__file__).resolve().parent.parent / "sample_models" / "resnet_trs.onnx"
    data = np.load(sample.parent / "trs_calib.npz")
    result = fold(onnx.load(sample), data=dict(data), batch_size=8, dry_run=True)
    assert any(b.mode_before.value == "training-decomposed" for b in result.report.bns)
    assert not [w for w in result.report.warnings if "batch axis" in w]
