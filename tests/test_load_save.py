"""Loading and saving through ``fold``: IR versions, external data, atomic writes, the input left alone,
initializer hygiene, old-IR models, node naming, models without BN."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import npref
from bnfold.errors import BadInputError, UnsupportedModelError
from bnfold.pipeline import fold, inspect
from bnfold.records import Action, Mode
from conftest import (
    EPS, assert_same_outputs, bn, bn_params, check_full, count_op, init, make_model, op_types, ort_run, rand,
    record, sha256, vi,
)


def conv_bn(rng, *, c_in=3, c_out=4, ir_version=10, training=False, big=False):
    w = rand(rng, c_out * (8 if big else 1), c_in, 3, 3)
    c_out = w.shape[0]
    b = rand(rng, c_out)
    p = bn_params(rng, c_out)
    if training:
        names = ["bn.scale", "bn.bias", "bn.mean", "bn.var"]
        bn_inits = [init(n, p[k]) for n, k in zip(names, ("scale", "bias", "mean", "var"))]
        bn_node = helper.make_node("BatchNormalization", ["z", *names], ["y", "rm", "rv"], name="bn", epsilon=EPS,
                                   training_mode=1)
    else:
        bn_node, bn_inits = bn("bn", "z", "y", p)
    model = make_model([helper.make_node("Conv", ["x", "w", "b"], ["z"], name="conv", pads=[1] * 4), bn_node],
                       [vi("x", ["N", c_in, 5, 5])], [vi("y", 4)], [init("w", w), init("b", b)] + bn_inits,
                       ir_version=ir_version)
    return model, w, b, p


def leftovers(directory) -> list[str]:
    """Temporary files or folders bnfold may have left behind."""
    return sorted(n for n in os.listdir(directory) if n.startswith(".") or "tmp" in n.lower() or "bnfold" in n)


# ---- IR version -----------------------------------------------------------------------------
def test_ir14_input_output_loads_in_onnxruntime_without_verify(rng, tmp_path):
    model, w, b, p = conv_bn(rng, ir_version=onnx.IR_VERSION)
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    assert onnx.load(src).ir_version == onnx.IR_VERSION >= 14
    fold(src, output=out, verify=False)
    x = rand(rng, 2, 3, 5, 5)
    y = ort_run(out, {"x": x})[0]  # onnxruntime 1.31 accepts IR <= 13
    expect = npref.batchnorm(npref.conv(x, w, b, pads=[1] * 4), p["scale"], p["bias"], p["mean"], p["var"], EPS)
    np.testing.assert_allclose(y, expect, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("training", [False, True])
def test_ir14_input_folds_and_verifies(rng, tmp_path, training):
    """The default IR of onnx 1.23 is 14; onnxruntime 1.31 refuses it. Verification must still run."""
    model, *_ = conv_bn(rng, ir_version=onnx.IR_VERSION, training=training)
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    data = {"x": rand(rng, 6, 3, 5, 5)} if training else None
    res = fold(src, output=out, data=data, batch_size=4 if training else None)
    assert res.report.verification is not None and res.report.verification.passed
    assert onnx.load(out).ir_version <= 13
    ort_run(out, {"x": rand(rng, 1, 3, 5, 5)})


def test_ir_version_kept_when_accepted(rng, tmp_path):
    model, *_ = conv_bn(rng, ir_version=8)
    out = tmp_path / "out.onnx"
    fold(model, output=out)
    assert onnx.load(out).ir_version == 8


# ---- external data --------------------------------------------------------------------------
def test_external_data_preserved_and_loads_from_another_cwd(rng, tmp_path, monkeypatch):
    model, w, b, p = conv_bn(rng, big=True)
    src_dir, out_dir, other = tmp_path / "in", tmp_path / "out", tmp_path / "elsewhere"
    for d in (src_dir, out_dir, other):
        d.mkdir()
    src = src_dir / "m.onnx"
    onnx.save(model, src, save_as_external_data=True, all_tensors_to_one_file=True, location="m.weights",
              size_threshold=0)
    before = {n: sha256(src_dir / n) for n in os.listdir(src_dir)}
    monkeypatch.chdir(other)
    out = out_dir / "f.onnx"
    res = fold(src, output=out)
    assert res.report.verification.passed
    # the output keeps its tensors outside, in a file next to it
    stored = onnx.load(out, load_external_data=False)
    external = [t for t in stored.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external, "the folded weight should stay in external data"
    locations = {e.value for t in external for e in t.external_data if e.key == "location"}
    assert all(not os.path.isabs(loc) and (out_dir / loc).exists() for loc in locations)
    assert sorted(os.listdir(out_dir)) == sorted(["f.onnx", *locations])
    assert os.listdir(other) == []
    # loads (path-based) from another working directory
    monkeypatch.chdir(tmp_path)
    x = rand(rng, 2, 3, 5, 5)
    expect = npref.batchnorm(npref.conv(x, w, b, pads=[1] * 4), p["scale"], p["bias"], p["mean"], p["var"], EPS)
    np.testing.assert_allclose(ort_run(out, {"x": x})[0], expect, rtol=1e-4, atol=1e-4)
    check_full(onnx.load(out))
    # the input and its data file untouched
    assert {n: sha256(src_dir / n) for n in os.listdir(src_dir)} == before


def test_external_data_output_next_to_input(rng, tmp_path):
    model, *_ = conv_bn(rng, big=True)
    src = tmp_path / "m.onnx"
    onnx.save(model, src, save_as_external_data=True, all_tensors_to_one_file=True, location="m.onnx.data",
              size_threshold=0)
    before = {n: sha256(tmp_path / n) for n in os.listdir(tmp_path)}
    fold(src, output=tmp_path / "folded.onnx")
    after = {n: sha256(tmp_path / n) for n in os.listdir(tmp_path) if n in before}
    assert after == before
    assert leftovers(tmp_path) == []
    ort_run(tmp_path / "folded.onnx", {"x": rand(rng, 1, 3, 5, 5)})


# ---- the input is never modified; writes are atomic -----------------------------------------
def test_success_leaves_input_alone_and_no_temp_files(rng, tmp_path):
    model, *_ = conv_bn(rng)
    src, out = tmp_path / "m.onnx", tmp_path / "out" / "f.onnx"
    onnx.save(model, src)
    h = sha256(src)
    res = fold(src, output=out)
    assert sha256(src) == h
    assert res.report.input_sha256 == h
    assert res.report.output_sha256 == sha256(out)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "out"]
    assert os.listdir(out.parent) == ["f.onnx"]


def test_verification_failure_writes_nothing(rng, tmp_path):
    model, *_ = conv_bn(rng)
    src, out = tmp_path / "m.onnx", tmp_path / "f.onnx"
    onnx.save(model, src)
    h = sha256(src)
    res = fold(src, output=out, atol=0.0, rtol=0.0)  # folding reorders float ops: not bit-exact
    assert res.report.verification is not None and not res.report.verification.passed
    assert not res.ok
    assert not out.exists()
    assert sha256(src) == h
    assert os.listdir(tmp_path) == ["m.onnx"]


def test_verification_failure_with_output_equal_to_input_keeps_input(rng, tmp_path):
    model, *_ = conv_bn(rng)
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    h = sha256(src)
    res = fold(src, output=src, atol=0.0, rtol=0.0)
    assert not res.ok
    assert sha256(src) == h
    assert os.listdir(tmp_path) == ["m.onnx"]


def test_error_leaves_input_alone_and_no_temp_files(rng, tmp_path):
    model, *_ = conv_bn(rng, training=True)
    src, out = tmp_path / "m.onnx", tmp_path / "f.onnx"
    onnx.save(model, src)
    h = sha256(src)
    with pytest.raises(BadInputError):
        fold(src, output=out)  # training BN, no data
    with pytest.raises(BadInputError):
        fold(src, output=src, data={"x": rand(rng, 4, 3, 6, 6)})  # wrong data shape
    assert sha256(src) == h
    assert os.listdir(tmp_path) == ["m.onnx"]


def test_unsupported_opset6_bn_is_an_error_and_writes_nothing(rng, tmp_path):
    """onnxruntime 1.31 has no opset-6 BatchNormalization: a clear error, nothing written."""
    p = bn_params(rng, 4)
    bn_node, bn_inits = bn("bn", "z", "y", p, is_test=1)
    model = make_model([helper.make_node("Conv", ["x", "w"], ["z"], name="conv"), bn_node],
                       [vi("x", ["N", 3, 5, 5])], [vi("y", 4)], [init("w", rand(rng, 4, 3, 3, 3))] + bn_inits,
                       opset=6, ir_version=4)
    src, out = tmp_path / "m.onnx", tmp_path / "f.onnx"
    onnx.save(model, src)
    h = sha256(src)
    with pytest.raises(UnsupportedModelError):
        fold(src, output=out)
    assert sha256(src) == h
    assert os.listdir(tmp_path) == ["m.onnx"]


def test_dry_run_writes_nothing(rng, tmp_path):
    model, *_ = conv_bn(rng)
    src, out = tmp_path / "m.onnx", tmp_path / "f.onnx"
    onnx.save(model, src)
    res = fold(src, output=out, dry_run=True)
    assert res.report.bns[0].action is Action.FOLDED
    assert os.listdir(tmp_path) == ["m.onnx"]


@pytest.mark.parametrize("content", [b"", b"not an onnx model at all \x00\xff"])
def test_not_an_onnx_file(tmp_path, content):
    src = tmp_path / "m.onnx"
    src.write_bytes(content)
    with pytest.raises(BadInputError):
        fold(src, output=tmp_path / "f.onnx")
    assert os.listdir(tmp_path) == ["m.onnx"]


def test_missing_file(tmp_path):
    with pytest.raises(BadInputError, match="not found"):
        fold(tmp_path / "nope.onnx")


# ---- initializers ---------------------------------------------------------------------------
def _used_names(model):
    used = {i for n in model.graph.node for i in n.input if i}
    return used | {o.name for o in model.graph.output}


def test_unused_initializers_removed(rng):
    model, *_ = conv_bn(rng)
    res = fold(model)
    names = [t.name for t in res.model.graph.initializer]
    assert len(names) == len(set(names))
    assert set(names) <= _used_names(res.model)
    assert not any(n.startswith("bn.") for n in names)
    assert len(names) == 2  # folded weight and bias


def test_unused_initializers_removed_after_many_folds(rng):
    nodes, inits, cur, c = [], [], "x", 3
    for i in range(4):
        inits.append(init(f"w{i}", rand(rng, 4, c, 1, 1)))
        nodes.append(helper.make_node("Conv", [cur, f"w{i}"], [f"c{i}"], name=f"conv{i}"))
        bn_node, bn_inits = bn(f"bn{i}", f"c{i}", f"b{i}", bn_params(rng, 4))
        nodes.append(bn_node)
        inits += bn_inits
        cur, c = f"b{i}", 4
    model = make_model(nodes, [vi("x", ["N", 3, 4, 4])], [vi(cur, 4)], inits)
    res = fold(model)
    assert res.report.folded == 4
    names = {t.name for t in res.model.graph.initializer}
    assert names <= _used_names(res.model)
    assert len(res.model.graph.initializer) == 8


# ---- old IR: initializers listed as graph inputs --------------------------------------------
def _old_ir_model(rng, training: bool, opset: int):
    w, w2 = rand(rng, 4, 3, 3, 3), rand(rng, 5, 4, 1, 1)
    p = bn_params(rng, 4)
    names = ["bn.scale", "bn.bias", "bn.mean", "bn.var"]
    inits = [init(n, p[k]) for n, k in zip(names, ("scale", "bias", "mean", "var"))] + [init("w", w), init("w2", w2)]
    if training:
        outs = ["y", "rm", "rv"] if opset >= 14 else ["y", "rm", "rv", "sm", "sv"]
        attrs = {"training_mode": 1} if opset >= 14 else {}
    else:
        outs, attrs = ["y"], {}
    nodes = [helper.make_node("Conv", ["x", "w"], ["z"], name="conv", pads=[1] * 4),
             helper.make_node("BatchNormalization", ["z", *names], outs, name="bn", epsilon=EPS, **attrs),
             helper.make_node("Conv", ["y", "w2"], ["out"], name="conv2")]
    inputs = [vi("x", ["N", 3, 5, 5])] + [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                                          for t in inits]
    ir = 3 if opset <= 8 else 6
    return make_model(nodes, inputs, [vi("out", 4)], inits, opset=opset, ir_version=ir)


def test_old_ir_initializers_as_inputs_fold_without_data(rng, tmp_path):
    model = _old_ir_model(rng, training=False, opset=8)
    x = rand(rng, 2, 3, 5, 5)
    ort_run(model, {"x": x})
    res = fold(model, output=tmp_path / "f.onnx")
    assert res.report.folded == 1
    assert res.report.verification is not None and res.report.verification.passed
    out = onnx.load(tmp_path / "f.onnx")
    check_full(out)
    assert_same_outputs(model, out, {"x": x}, rtol=1e-4, atol=1e-4)
    inits = {t.name for t in out.graph.initializer}
    assert all(i.name in inits for i in out.graph.input if i.name != "x"), "no dangling input without a value"


@pytest.mark.parametrize("opset", [8, 15])
def test_old_ir_initializers_as_inputs_calibrate(rng, opset):
    """With data: the initializers listed as inputs are constants, not inputs the data must supply."""
    model = _old_ir_model(rng, training=True, opset=opset)
    res = fold(model, data={"x": rand(rng, 6, 3, 5, 5)}, batch_size=4)
    assert record(res, "bn").mode_before is Mode.TRAINING
    assert record(res, "bn").action is Action.FOLDED
    assert res.report.verification.passed


# ---- naming, pass-through -------------------------------------------------------------------
def test_unnamed_and_duplicate_nodes_get_unique_names(rng):
    nodes, inits, cur, c = [], [], "x", 3
    for i in range(3):
        inits.append(init(f"w{i}", rand(rng, 4, c, 3, 3)))
        nodes.append(helper.make_node("Conv", [cur, f"w{i}"], [f"c{i}"], pads=[1] * 4))  # no name
        bn_node, bn_inits = bn("", f"c{i}", f"b{i}", bn_params(rng, 4), prefix=f"bn{i}")
        nodes.append(bn_node)
        inits += bn_inits
        nodes.append(helper.make_node("Relu", [f"b{i}"], [f"r{i}"], name="dup"))
        cur, c = f"r{i}", 4
    # one BN that stays: on a graph input, so there are kept and folded unnamed BNs
    extra, extra_inits = bn("", "x2", "y2", bn_params(rng, 3), prefix="bnx")
    model = make_model(nodes + [extra], [vi("x", ["N", 3, 5, 5]), vi("x2", ["N", 3, 5, 5])], [vi(cur, 4), vi("y2", 4)],
                       inits + extra_inits)
    res = fold(model)
    names = [r.name for r in res.report.bns]
    assert len(names) == 4 and len(set(names)) == 4 and all(names)
    assert res.report.folded == 3 and res.report.kept == 1
    targets = [r.target for r in res.report.bns if r.target]
    assert len(set(targets)) == 3 and all(targets)
    node_names = [n.name for n in res.model.graph.node]
    assert all(node_names) and len(node_names) == len(set(node_names))
    assert set(targets) <= set(node_names)
    assert [i.name for i in inspect(model)] == names
    check_full(res.model)


def test_model_without_bn_passes_through(rng, tmp_path):
    w = rand(rng, 4, 3, 3, 3)
    model = make_model([helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1] * 4),
                        helper.make_node("Relu", ["c"], ["y"], name="relu")],
                       [vi("x", ["N", 3, 5, 5])], [vi("y", 4)], [init("w", w)])
    out = tmp_path / "f.onnx"
    res = fold(model, output=out)
    assert res.report.bns == [] and res.report.folded == 0
    assert res.report.verification is None or res.report.verification.passed
    folded = onnx.load(out)
    assert op_types(folded) == ["Conv", "Relu"]
    np.testing.assert_array_equal(numpy_helper.to_array(folded.graph.initializer[0]), w)
    x = rand(rng, 2, 3, 5, 5)
    np.testing.assert_array_equal(ort_run(out, {"x": x})[0], ort_run(model, {"x": x})[0])
    assert inspect(model) == []
    # with calibration data too (nothing to calibrate)
    res = fold(model, data={"x": rand(rng, 4, 3, 5, 5)})
    assert res.report.bns == []


def test_model_with_fixed_batch_and_wrong_batch_size(rng):
    model, *_ = conv_bn(rng, training=True)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    with pytest.raises(BadInputError, match="batch"):
        fold(model, data={"x": rand(rng, 6, 3, 5, 5)}, batch_size=4)
    res = fold(model, data={"x": rand(rng, 6, 3, 5, 5)})
    assert res.report.batch_size == 2 and res.report.verification.passed


def test_overwriting_external_data_output_is_atomic(rng, tmp_path, monkeypatch):
    """Replacing an existing model + data pair: a failure while moving the new files into place must
    not leave the old model pointing into the new data file."""
    model_a, wa, ba, pa = conv_bn(rng, big=True)
    model_b, *_ = conv_bn(rng, big=True)
    src_a, src_b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    for m, src in ((model_a, src_a), (model_b, src_b)):
        onnx.save(m, src, save_as_external_data=True, all_tensors_to_one_file=True, location=src.name + ".data",
                  size_threshold=0)
    out_dir = tmp_path / "out"
    out = out_dir / "f.onnx"
    fold(src_a, output=out)
    x = rand(rng, 1, 3, 5, 5)
    y_a = ort_run(out, {"x": x})[0]
    before = sorted(os.listdir(out_dir))

    real_replace = os.replace

    def failing_replace(src, dst, *a, **k):
        if os.fspath(dst) == os.fspath(out):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(Exception):
        fold(src_b, output=out)
    monkeypatch.setattr(os, "replace", real_replace)
    assert sorted(os.listdir(out_dir)) == before
    np.testing.assert_array_equal(ort_run(out, {"x": x})[0], y_a)


def test_fixed_batch_with_short_last_batch(rng):
    """Either the remainder is dropped (with a warning) or the error says so up front."""
    model, *_ = conv_bn(rng, training=True)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    try:
        res = fold(model, data={"x": rand(rng, 5, 3, 5, 5)})
    except BadInputError as exc:
        assert "batch size" in str(exc) and "5" in str(exc), str(exc)
    else:
        assert res.report.bns[0].stats.batches == 2 and res.report.warnings
