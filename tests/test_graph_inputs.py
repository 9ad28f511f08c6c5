"""Graph inputs that are not the batch (issue 14 point 6).

(a) A second input of static, non-batch shape (``s[4,1,1]``) is fed by ``fold``'s verification at
    its declared shape, as ``bnfold verify`` does, with or without calibration data (data that
    supplies only ``x`` calibrates; ``s`` then gets random values for verification).
(b) BN parameters or a Conv weight given as graph inputs (no initializer): the BN is kept
    (NOT_CONSTANT) and the model is verified with those inputs fed random values of their shape.
(c) An initializer also listed in ``graph.input`` of an IR >= 4 model is an overridable default
    (onnxruntime feeds it when the caller does): it is not a constant, so nothing that reads it is
    folded or scaled in place, and every graph input stays in the output. In IR < 4 every
    initializer is listed and they are constants: those still fold, and the output (written as
    IR >= 4) lists none of them, so nothing the input kept constant becomes overridable.

Every numerical comparison runs the unfolded input (or the frozen reference) in onnxruntime with
the same feeds. Tolerances: 1e-4 relative/absolute, the float32 error of folding a 3x3x3 Conv
(27-term sums of O(1) values, ~1e-6 per term, scaled by BN factors up to 2/sqrt(0.5)); results
that must be bit-identical (nothing folded) are compared exactly.
"""
from __future__ import annotations

from pathlib import Path

import npref
import numpy as np
import onnx
import pytest
from cli_run import run_cli
from conftest import EPS, bn, bn_params, init, make_model, ort_run, rand, record, vi
from onnx import helper, numpy_helper

from bnfold.api import fold
from bnfold.records import Action, Mode, Reason

TOL = 1e-4  # see the module docstring


def _assert_close(a: np.ndarray, b: np.ndarray) -> None:
    np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), rtol=TOL, atol=TOL)


def conv_bn_mix(rng: np.random.Generator, xshape: list, op: str = "Add", *, training: bool = False,
                s_first: bool = False) -> onnx.ModelProto:
    """x -> Conv -> BN -> ``op``(., s) -> y with a second input ``s`` of shape [4, 1, 1]
    (``s_first``: s multiplies x's Conv output before the BN, so the statistics depend on it)."""
    w = rand(rng, 4, 3, 3, 3)
    node, inits = bn("bn", "m" if s_first else "c", "b", bn_params(rng, 4),
                     **({"training_mode": 1} if training else {}))
    if training:
        node.output.extend(["rm", "rv"])
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1] * 4)]
    if s_first:
        nodes += [helper.make_node("Mul", ["c", "s"], ["m"], name="mix"), node,
                  helper.make_node("Relu", ["b"], ["y"], name="relu")]
    else:
        nodes += [node, helper.make_node(op, ["b", "s"], ["y"], name="mix")]
    return make_model(nodes, [vi("x", xshape), vi("s", [4, 1, 1])], [vi("y", 4)], [init("w", w)] + inits)


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def _feeds(rng: np.random.Generator, xshape: list) -> dict[str, np.ndarray]:
    n = xshape[0] if isinstance(xshape[0], int) else 2
    return {"x": rand(rng, n, *xshape[1:]), "s": rand(rng, 4, 1, 1)}


# ---- (a) a second input of static non-batch shape ---------------------------------------------
@pytest.mark.parametrize("xshape,op", [([1, 3, 5, 5], "Add"), ([2, 3, 5, 5], "Mul"), (["N", 3, 5, 5], "Add")])
def test_static_second_input_fold_verifies_like_verify(rng, tmp_path, xshape, op):
    """Before: fold's verification fed ``s`` a batch axis (or ``x`` the wrong one) and exited 3
    ("Got invalid dimensions for input: s") while ``bnfold verify`` passed the same pair."""
    model = _save(conv_bn_mix(rng, xshape, op), tmp_path / "m.onnx")
    out, frozen = tmp_path / "out.onnx", tmp_path / "frozen.onnx"
    proc = run_cli("fold", model, "-o", out, "--frozen-output", frozen)
    assert proc.returncode == 0, proc.stderr
    assert "PASSED" in proc.stdout
    assert run_cli("verify", frozen, out).returncode == 0
    feeds = _feeds(rng, xshape)
    _assert_close(ort_run(out, feeds)[0], ort_run(model, feeds)[0])
    assert onnx.load(str(out)).graph.node[0].op_type == "Conv" and len(onnx.load(str(out)).graph.node) == 2


@pytest.mark.parametrize("kind", ["npz", "npy", "folder"])
def test_static_second_input_with_data_for_x_only(rng, tmp_path, kind):
    """Calibration data that supplies only ``x``: the statistics do not depend on ``s`` (it is
    read after the BN), so the BN is calibrated and folded; ``--batch-size 2`` is not overridden by
    ``s``'s first dim (4, which is not a batch). A ``.npy`` is the one input with a batch axis.
    Before: exit 3, "model input 's' has a fixed batch size of 4" (without --batch-size: "no array
    for model input 's'"; a .npy: "holds one array, but the model has 2 inputs")."""
    model = _save(conv_bn_mix(rng, ["N", 3, 5, 5], training=True), tmp_path / "m.onnx")
    x = rand(rng, 6, 3, 5, 5)
    if kind == "npy":
        np.save(data := tmp_path / "d.npy", x)
    elif kind == "npz":
        np.savez(data := tmp_path / "d.npz", x=x)
    else:
        (data := tmp_path / "d").mkdir()
        np.savez(data / "a.npz", x=x[:3])
        np.savez(data / "b.npz", x=x[3:])
    out, frozen = tmp_path / "out.onnx", tmp_path / "frozen.onnx"
    proc = run_cli("fold", model, "--data", data, "--batch-size", "2", "-o", out, "--frozen-output", frozen)
    assert proc.returncode == 0, proc.stderr
    assert "PASSED" in proc.stdout and "folded 1" in proc.stdout
    assert run_cli("verify", frozen, out).returncode == 0
    feeds = _feeds(rng, ["N", 3, 5, 5])
    _assert_close(ort_run(out, feeds)[0], ort_run(frozen, feeds)[0])


def test_static_second_input_with_data_for_both(rng):
    """Data that supplies ``s`` too (one value per sample, as every data array) still works."""
    model = conv_bn_mix(rng, ["N", 3, 5, 5], training=True)
    res = fold(model, data={"x": rand(rng, 8, 3, 5, 5), "s": rand(rng, 8, 1, 1)})
    assert record(res, "bn").action is Action.FOLDED
    assert res.report.verification is not None and res.report.verification.passed


def test_data_without_an_input_the_statistics_need(rng, tmp_path):
    """``s`` scales the BN's input: statistics without it would be made up, so data lacking it is
    bad input (exit 3) naming ``s``."""
    model = _save(conv_bn_mix(rng, ["N", 3, 5, 5], training=True, s_first=True), tmp_path / "m.onnx")
    data = tmp_path / "d.npz"
    np.savez(data, x=rand(rng, 6, 3, 5, 5))
    proc = run_cli("fold", model, "--data", data, "-o", tmp_path / "out.onnx")
    assert proc.returncode == 3, proc.stderr
    assert "'s'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out.onnx").exists()


# ---- (b) BN parameters or weights as graph inputs without a value -----------------------------
def _bn_params_as_inputs(rng: np.random.Generator, batch: int | str) -> onnx.ModelProto:
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1] * 4),
             helper.make_node("BatchNormalization", ["c", "g", "be", "mu", "v"], ["y"], name="bn", epsilon=EPS)]
    return make_model(nodes, [vi("x", [batch, 3, 5, 5])] + [vi(n, [4]) for n in ("g", "be", "mu", "v")],
                      [vi("y", 4)], [init("w", rand(rng, 4, 3, 3, 3))])


def _weight_as_input(rng: np.random.Generator, batch: int | str) -> onnx.ModelProto:
    node, inits = bn("bn", "c", "y", bn_params(rng, 4))
    return make_model([helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1] * 4), node],
                      [vi("x", [batch, 3, 5, 5]), vi("w", [4, 3, 3, 3])], [vi("y", 4)], inits)


@pytest.mark.parametrize("build", [_bn_params_as_inputs, _weight_as_input])
@pytest.mark.parametrize("batch", [2, "N"])
def test_parameters_as_graph_inputs_kept_and_verified(rng, tmp_path, build, batch):
    """Before (batch 2): exit 3, "Got invalid dimensions for input: v" (or x): the parameters were
    fed a batch axis. They are fed at their declared shapes; the BN is kept (NOT_CONSTANT)."""
    model = _save(build(rng, batch), tmp_path / "m.onnx")
    out = tmp_path / "out.onnx"
    proc = run_cli("fold", model, "-o", out, "--report", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    assert "PASSED" in proc.stdout and "NOT_CONSTANT: 1" in proc.stdout
    res = fold(model)
    assert record(res, "bn").reason is Reason.NOT_CONSTANT
    folded = onnx.load(str(out))
    assert [i.name for i in folded.graph.input] == [i.name for i in onnx.load(str(model)).graph.input]


# ---- (c) initializers that are also graph inputs ----------------------------------------------
def _listed(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """``model`` with the initializers ``names`` listed among the graph inputs too (IR 10)."""
    inits = {t.name: t for t in model.graph.initializer}
    for n in names:
        model.graph.input.append(helper.make_tensor_value_info(n, inits[n].data_type, list(inits[n].dims)))
    onnx.checker.check_model(model, full_check=True)
    return model


def _conv_bn(rng: np.random.Generator) -> onnx.ModelProto:
    node, inits = bn("bn", "c", "y", bn_params(rng, 4))
    return make_model([helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1] * 4), node],
                      [vi("x", ["N", 3, 5, 5])], [vi("y", 4)], [init("w", rand(rng, 4, 3, 3, 3))] + inits)


def _matmul_bn(rng: np.random.Generator) -> onnx.ModelProto:
    node, inits = bn("bn", "c", "y", bn_params(rng, 4))
    return make_model([helper.make_node("MatMul", ["x", "w"], ["c"], name="mm"), node],
                      [vi("x", ["N", 6])], [vi("y", 2)], [init("w", rand(rng, 6, 4))] + inits)


@pytest.mark.parametrize("build,xshape", [(_conv_bn, (2, 3, 5, 5)), (_matmul_bn, (2, 6))])
def test_overridable_weight_is_not_folded(rng, tmp_path, build, xshape):
    """An IR 10 weight initializer listed as an input is a default the caller may replace. Before:
    the BN was folded into it in place, so feeding ``w`` to the output gave results off by the
    BN's scale (max error 7.5 of 14.8). Now: kept NOT_CONSTANT, ``w`` unchanged and still an input;
    verification passes on the defaults, and a fed ``w`` gives the input model's result."""
    model = _listed(build(rng), ["w"])
    out = tmp_path / "out.onnx"
    res = fold(model, output=out)
    assert record(res, "bn").action is Action.FROZEN_KEPT and record(res, "bn").reason is Reason.NOT_CONSTANT
    assert res.report.verification is not None and res.report.verification.passed
    folded = onnx.load(str(out))
    assert [i.name for i in folded.graph.input] == [i.name for i in model.graph.input]
    w_in = next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "w")
    w_out = next(numpy_helper.to_array(t) for t in folded.graph.initializer if t.name == "w")
    np.testing.assert_array_equal(w_out, w_in)  # nothing scaled in place
    x = rand(rng, *xshape)
    other = rand(rng, *w_in.shape)
    np.testing.assert_array_equal(ort_run(out, {"x": x, "w": other})[0], ort_run(model, {"x": x, "w": other})[0])
    np.testing.assert_array_equal(ort_run(out, {"x": x})[0], ort_run(model, {"x": x})[0])


def _conv_bias_bn(rng: np.random.Generator) -> onnx.ModelProto:
    node, inits = bn("bn", "c", "y", bn_params(rng, 4))
    return make_model([helper.make_node("Conv", ["x", "w", "cb"], ["c"], name="conv", pads=[1] * 4), node],
                      [vi("x", ["N", 3, 5, 5])], [vi("y", 4)],
                      [init("w", rand(rng, 4, 3, 3, 3)), init("cb", rand(rng, 4))] + inits)


def _bn_conv_forward(rng: np.random.Generator) -> onnx.ModelProto:
    """BN on the graph input, then an unpadded Conv: the forward fold's case."""
    node, inits = bn("bn", "x", "b", bn_params(rng, 3))
    return make_model([node, helper.make_node("Conv", ["b", "w"], ["y"], name="conv")],
                      [vi("x", ["N", 3, 5, 5])], [vi("y", 4)], [init("w", rand(rng, 4, 3, 3, 3))] + inits)


def _gemm_bn(rng: np.random.Generator) -> onnx.ModelProto:
    node, inits = bn("bn", "c", "y", bn_params(rng, 4))
    return make_model([helper.make_node("Gemm", ["x", "w", "cb"], ["c"], name="gemm", transB=1), node],
                      [vi("x", ["N", 6])], [vi("y", 2)], [init("w", rand(rng, 4, 6)), init("cb", rand(rng, 4))] + inits)


@pytest.mark.parametrize("build,listed,xshape", [(_conv_bias_bn, "cb", (2, 3, 5, 5)), (_bn_conv_forward, "w", (2, 3, 5, 5)),
                                                 (_gemm_bn, "cb", (2, 6)), (_gemm_bn, "w", (2, 6))])
def test_overridable_bias_or_forward_weight_is_not_folded(rng, tmp_path, build, listed, xshape):
    """The other places a fold writes: a Conv/Gemm bias, a following Conv's weight (forward)."""
    model = _listed(build(rng), [listed])
    out = tmp_path / "out.onnx"
    res = fold(model, output=out)
    assert record(res, "bn").reason is Reason.NOT_CONSTANT and res.report.verification.passed
    default = next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == listed)
    x, other = rand(rng, *xshape), rand(rng, *default.shape)
    np.testing.assert_array_equal(ort_run(out, {"x": x, listed: other})[0],
                                  ort_run(model, {"x": x, listed: other})[0])


def test_overridable_bn_parameters_stay_inputs(rng, tmp_path):
    """BN parameters listed as inputs (IR 10). Before: folded, and the output had no input
    'bn.scale' ("Invalid input name: bn.scale" for a caller who fed it)."""
    names = ["bn.scale", "bn.bias", "bn.mean", "bn.var"]
    model = _listed(_conv_bn(rng), names)
    out = tmp_path / "out.onnx"
    res = fold(model, output=out)
    assert record(res, "bn").reason is Reason.NOT_CONSTANT and res.report.folded == 0
    assert res.report.verification.passed
    folded = onnx.load(str(out))
    assert [i.name for i in folded.graph.input] == ["x", *names]
    feeds = {"x": rand(rng, 2, 3, 5, 5), "bn.scale": rand(rng, 4), "bn.var": np.full(4, 3.0, np.float32)}
    np.testing.assert_array_equal(ort_run(out, feeds)[0], ort_run(model, feeds)[0])


def test_overridable_training_bn_is_frozen_but_kept(rng, tmp_path):
    """A training-mode BN whose four parameters are overridable inputs (opset 15, IR 6).

    Its output ignores input_mean/input_var (batch statistics), so freezing writes new mean/var
    initializers and nothing is lost: the old mean/var inputs stay in the interface, unread. But
    it keeps reading scale and bias from the inputs, which a caller may replace: folding them into
    the Conv would bake in the defaults, so it is kept (NOT_CONSTANT). Calibration runs with the
    defaults (the channel count comes from the default value). A fed scale gives the frozen
    reference's result exactly.
    """
    names = ["bn.scale", "bn.bias", "bn.mean", "bn.var"]
    node, inits = bn("bn", "c", "y", bn_params(rng, 4), training_mode=1)
    node.output.extend(["rm", "rv"])
    model = make_model([helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1] * 4), node],
                       [vi("x", ["N", 3, 5, 5])], [vi("y", 4)], [init("w", rand(rng, 4, 3, 3, 3))] + inits,
                       opset=15, ir_version=6)
    model = _listed(model, names)
    out, frozen = tmp_path / "out.onnx", tmp_path / "frozen.onnx"
    res = fold(model, data={"x": rand(rng, 8, 3, 5, 5)}, batch_size=4, output=out, frozen_output=frozen)
    r = record(res, "bn")
    assert r.mode_before is Mode.TRAINING and r.action is Action.FROZEN_KEPT and r.reason is Reason.NOT_CONSTANT
    assert r.stats is not None  # calibrated
    assert res.report.verification.passed
    folded = onnx.load(str(out))
    assert [i.name for i in folded.graph.input] == ["x", *names]
    feeds = {"x": rand(rng, 2, 3, 5, 5), "bn.scale": rand(rng, 4), "bn.bias": rand(rng, 4)}
    np.testing.assert_array_equal(ort_run(out, feeds)[0], ort_run(frozen, feeds)[0])
    # independent float64 reference: the frozen BN with the calibrated statistics and the FED scale/bias
    w = next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "w")
    ref = npref.batchnorm(npref.conv(feeds["x"], w, pads=[1] * 4), feeds["bn.scale"], feeds["bn.bias"],
                          r.stats.mean, r.stats.var, EPS)
    _assert_close(ort_run(out, feeds)[0], ref)


def test_old_ir_listed_initializers_stay_constants(rng, tmp_path):
    """IR 3 lists every initializer as an input, and onnxruntime refuses a feed for one ("Invalid
    input name"): they are constants, so the BN folds; the output is written as IR >= 4, where a
    listed initializer would become overridable, so it lists none."""
    model = _conv_bn(rng)
    for t in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    model.opset_import[0].version = 8
    model.ir_version = 3
    out = tmp_path / "out.onnx"
    res = fold(model, output=out)
    assert res.report.folded == 1 and res.report.verification.passed
    folded = onnx.load(str(out))
    assert folded.ir_version >= 4
    assert [i.name for i in folded.graph.input] == ["x"]
    x = rand(rng, 2, 3, 5, 5)
    _assert_close(ort_run(out, {"x": x})[0], ort_run(model, {"x": x})[0])
