"""Loading and saving through ``fold``: IR versions, external data, atomic writes, the input left alone,
initializer hygiene, old-IR models, node naming, models without BN."""
from __future__ import annotations

import os
from pathlib import Path

import npref
import numpy as np
import onnx
import pytest
from conftest import (
    EPS,
    assert_same_outputs,
    bn,
    bn_params,
    check_full,
    count_op,
    init,
    make_model,
    op_types,
    ort_run,
    rand,
    record,
    sha256,
    vi,
)
from onnx import helper, numpy_helper

from bnfold.api import fold, inspect
from bnfold.errors import BadInputError, UnsupportedModelError
from bnfold.onnx.runtime import ort_max_ir_version
from bnfold.records import Action, Mode, Reason
from bnfold.verification.engine import VerifyConfig


def _fail_replace_onto(monkeypatch, target) -> None:
    """Make ``os.replace`` onto ``target`` fail as a full disk would (other renames still work)."""
    real_replace = os.replace

    def failing_replace(src, dst, *a, **k):
        if os.fspath(dst) == os.fspath(target):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", failing_replace)


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
    y = ort_run(out, {"x": x})[0]  # onnxruntime 1.31 accepts IR <= 13, 1.32 accepts 14
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
    assert onnx.load(out).ir_version == min(onnx.IR_VERSION, ort_max_ir_version())
    ort_run(out, {"x": rand(rng, 1, 3, 5, 5)})


def refuse_newest_ir(monkeypatch) -> None:
    """Make bnfold see an onnxruntime that accepts IR versions below onnx's newest only."""
    import bnfold.onnx.runtime as session

    monkeypatch.setattr(session, "ort_max_ir_version", lambda: onnx.IR_VERSION - 1)


def test_ir_version_clamped_to_what_onnxruntime_accepts(rng, tmp_path, monkeypatch):
    """An onnxruntime that refuses the input's IR version (1.31 refuses 14) gets its maximum.

    The installed onnxruntime may accept every IR onnx writes, so the probe is replaced by an
    older runtime's answer; the probe itself is checked against a real session below.
    """
    refuse_newest_ir(monkeypatch)
    model, *_ = conv_bn(rng, ir_version=onnx.IR_VERSION)
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    fold(src, output=out, verify=False)
    assert onnx.load(out).ir_version == onnx.IR_VERSION - 1


def test_ort_max_ir_version_is_accepted_and_the_next_is_not():
    import onnxruntime as ort

    top = ort_max_ir_version()
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )

    def accepted(ir: int) -> bool:
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=ir)
        try:
            ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        except Exception:
            return False
        return True

    assert accepted(top)
    assert top == onnx.IR_VERSION or not accepted(top + 1)


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


EXACT = VerifyConfig(atol=(0.0, {}), rtol=(0.0, {}), noise_floor=False)  # folding reorders float ops: not bit-exact


def test_verification_failure_writes_nothing(rng, tmp_path):
    model, *_ = conv_bn(rng)
    src, out = tmp_path / "m.onnx", tmp_path / "f.onnx"
    onnx.save(model, src)
    h = sha256(src)
    res = fold(src, output=out, verify_config=EXACT)  # folding reorders float ops: not bit-exact
    assert res.report.verification is not None and not res.report.verification.passed
    assert not res.ok
    assert not out.exists()
    assert sha256(src) == h
    assert os.listdir(tmp_path) == ["m.onnx"]


def test_output_equal_to_input_is_refused(rng, tmp_path):
    """The library never overwrites its input (before issue 14 only a failed verification kept it:
    a passing fold replaced the input model)."""
    model, *_ = conv_bn(rng)
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    h = sha256(src)
    for config in (EXACT, None):
        with pytest.raises(BadInputError, match="is the input model; bnfold never overwrites its input"):
            fold(src, output=src, verify_config=config)
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
    """With data: the initializers listed as inputs are not inputs the data must supply.

    Opset 8 is IR 3, where every initializer is listed and they are constants: the BN folds.
    Opset 15 is IR 6, where a listed initializer is an overridable default (issue 14 point 6):
    the BN is calibrated with the defaults and frozen, but keeps reading its scale and bias from
    the inputs, so it is kept (NOT_CONSTANT); verification on the defaults passes.
    """
    model = _old_ir_model(rng, training=True, opset=opset)
    res = fold(model, data={"x": rand(rng, 6, 3, 5, 5)}, batch_size=4)
    assert record(res, "bn").mode_before is Mode.TRAINING
    if opset == 8:
        assert record(res, "bn").action is Action.FOLDED
    else:
        assert record(res, "bn").action is Action.FROZEN_KEPT and record(res, "bn").reason is Reason.NOT_CONSTANT
        assert record(res, "bn").stats is not None
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

    _fail_replace_onto(monkeypatch, out)
    with pytest.raises(Exception):
        fold(src_b, output=out)
    monkeypatch.undo()
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


# ---- writing with external data (save_onnx) -------------------------------------------------
def _mixed_model(rng):
    """y = If(cond, then: a4 + sub, else: a4) with a4 = (x + c) + typed + (x + big), and
    z = (x + big)[:255] + small + k1024[:255].

    ``big`` (12 KB) and ``k1024`` (exactly 1024 bytes) have raw_data and go to the data file;
    ``small`` (1020 bytes), ``typed`` (float_data, not raw), the Constant node's tensor ``c`` and
    the subgraph's initializer ``sub`` stay in the model file."""
    n = 3000
    big = init("big", rand(rng, n))
    small = init("small", rand(rng, 255))
    k1024 = init("k1024", rand(rng, 256))
    typed = helper.make_tensor("typed", onnx.TensorProto.FLOAT, [n], rand(rng, n).tolist())
    const = numpy_helper.from_array(rand(rng, n), "cval")
    sub = init("sub", rand(rng, n))
    then_g = helper.make_graph([helper.make_node("Add", ["a4", "sub"], ["t"], name="sub_add")], "then", [],
                               [vi("t", [n])], [sub])
    else_g = helper.make_graph([helper.make_node("Identity", ["a4"], ["e"], name="sub_id")], "else", [],
                               [vi("e", [n])])
    nodes = [helper.make_node("Add", ["x", "big"], ["a0"], name="add0"),
             helper.make_node("Slice", ["a0", "s0", "s1"], ["a0s"], name="slice"),
             helper.make_node("Add", ["a0s", "small"], ["a1"], name="add1"),
             helper.make_node("Slice", ["k1024", "s0", "s1"], ["k255"], name="slice2"),
             helper.make_node("Add", ["a1", "k255"], ["z"], name="add5"),
             helper.make_node("Constant", [], ["c"], name="const", value=const),
             helper.make_node("Add", ["x", "c"], ["a2"], name="add2"),
             helper.make_node("Add", ["a2", "typed"], ["a3"], name="add3"),
             helper.make_node("Add", ["a3", "a0"], ["a4"], name="add4"),
             helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g)]
    inits = [big, init("s0", np.array([0])), init("s1", np.array([255])), small, typed,
             init("cond", np.array(True)), k1024]
    return make_model(nodes, [vi("x", [n])], [vi("y", [n]), vi("z", [255])], inits)


def _external_info(stored):
    return {t.name: {e.key: e.value for e in t.external_data}
            for t in stored.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}


def _all_values(model):
    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                out.update({f"{a.name}/{t.name}": numpy_helper.to_array(t) for t in a.g.initializer})
            elif a.type == onnx.AttributeProto.TENSOR:
                out[f"{node.name}/{a.name}"] = numpy_helper.to_array(a.t)
    return out


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_save_external_round_trip(rng, tmp_path, umask022):
    import re

    from bnfold.onnx.io import DATA_ALIGN, save_onnx

    model = _mixed_model(rng)
    before = model.SerializeToString()
    path = tmp_path / "m.onnx"
    digest = save_onnx(model, path, external_data=True)
    assert model.SerializeToString() == before, "the model in memory must not change"
    assert digest == sha256(path)
    [data] = [n for n in os.listdir(tmp_path) if n != "m.onnx"]
    assert re.fullmatch(r"m\.onnx\.[0-9a-f]{8}\.data", data)
    # permission bits of any new file under the umask (onnx itself would create 0600)
    assert (tmp_path / data).stat().st_mode & 0o777 == 0o644
    assert path.stat().st_mode & 0o777 == 0o644

    stored = onnx.load(path, load_external_data=False)
    info = _external_info(stored)
    assert sorted(info) == ["big", "k1024"]  # >= 1024 bytes of raw_data; the rest inline
    size = (tmp_path / data).stat().st_size
    for name, entry in info.items():
        assert entry["location"] == data
        assert int(entry["offset"]) % DATA_ALIGN == 0
        raw = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name)).tobytes()
        assert int(entry["length"]) == len(raw)
        with open(tmp_path / data, "rb") as fh:
            fh.seek(int(entry["offset"]))
            assert fh.read(len(raw)) == raw
        assert int(entry["offset"]) + len(raw) <= size
    inline = {t.name for t in stored.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL}
    assert {"small", "typed", "s0", "s1", "cond"} == inline
    sub = next(a.g for a in stored.graph.node[-1].attribute if a.name == "then_branch").initializer[0]
    assert sub.name == "sub" and sub.data_location != onnx.TensorProto.EXTERNAL and sub.raw_data
    const = next(n for n in stored.graph.node if n.op_type == "Constant").attribute[0].t
    assert const.data_location != onnx.TensorProto.EXTERNAL and const.raw_data

    # the same model, every value equal, and onnxruntime runs it (by path) like the model in memory
    back = onnx.load(path)
    expect = _all_values(model)
    got = _all_values(back)
    assert expect.keys() == got.keys()
    for k in expect:
        np.testing.assert_array_equal(got[k], expect[k])
    assert [n.name for n in back.graph.node] == [n.name for n in model.graph.node]
    onnx.checker.check_model(str(path), full_check=True)
    x = {"x": rand(rng, 3000)}
    for a, b in zip(ort_run(path, x), ort_run(model, x)):
        np.testing.assert_array_equal(a, b)


def test_save_external_twice_keeps_one_data_file(rng, tmp_path):
    from bnfold.onnx.io import save_onnx

    model = _mixed_model(rng)
    path = tmp_path / "m.onnx"
    save_onnx(model, path, external_data=True)
    first = set(os.listdir(tmp_path))
    save_onnx(model, path, external_data=True)
    second = set(os.listdir(tmp_path))
    assert len(first) == len(second) == 2 and first != second  # a fresh data-file name, the old one gone
    assert leftovers(tmp_path) == []
    x = {"x": rand(rng, 3000)}
    np.testing.assert_array_equal(ort_run(path, x)[0], ort_run(model, x)[0])


@pytest.mark.parametrize("umask", [0o027, 0o002])
def test_save_external_permissions_follow_umask(rng, tmp_path, umask):
    from bnfold.onnx.io import save_onnx

    model, *_ = conv_bn(rng, big=True)
    old = os.umask(umask)
    try:
        save_onnx(model, tmp_path / "m.onnx", external_data=True)
    finally:
        os.umask(old)
    modes = {n: (tmp_path / n).stat().st_mode & 0o777 for n in os.listdir(tmp_path)}
    assert len(modes) == 2 and set(modes.values()) == {0o666 & ~umask}, modes


def test_model_read_with_external_data_written_again(rng, tmp_path):
    from bnfold.onnx.io import load_onnx, save_onnx

    model, *_ = conv_bn(rng, big=True)
    src_dir, out_dir = tmp_path / "in", tmp_path / "out"
    src_dir.mkdir()
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # onnx.save with external data rewrites the model it is given
    onnx.save(copy, src_dir / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    loaded = load_onnx(src_dir / "m.onnx")
    assert loaded.external_data and loaded.locations == ("weights.bin",)
    before = loaded.model.SerializeToString()
    out = out_dir / "f.onnx"
    digest = save_onnx(loaded.model, out, external_data=True)
    assert loaded.model.SerializeToString() == before
    assert digest == sha256(out)
    info = _external_info(onnx.load(out, load_external_data=False))
    assert sorted(info) == ["w"]  # the BN parameters (16 bytes each) and the bias are inline now
    back = onnx.load(out)
    for t in model.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(next(u for u in back.graph.initializer
                                                                 if u.name == t.name)),
                                      numpy_helper.to_array(t))
    x = {"x": rand(rng, 2, 3, 5, 5)}
    np.testing.assert_array_equal(ort_run(out, x)[0], ort_run(model, x)[0])
    assert len(os.listdir(out_dir)) == 2


def test_save_external_without_large_tensors_writes_no_data_file(rng, tmp_path):
    """An earlier write's data file (bnfold's name and header) goes; files bnfold cannot prove it
    wrote stay: another name, or bnfold's name without its header (issue 14: only ours deleted)."""
    from bnfold.onnx.io import DATA_MAGIC, save_onnx

    model, *_ = conv_bn(rng)  # every tensor under 1 KiB
    path = tmp_path / "m.onnx"
    save_onnx(model, path, external_data=True)
    (tmp_path / "m.onnx.0badf00d.data").write_bytes(DATA_MAGIC + b"stale")  # as if from an earlier write
    foreign = {"m.onnx.data": b"x", "m.onnx.1badf00d.data": b"not ours", "m.onnx.backup.data": DATA_MAGIC,
               "m.onnx.2badf00d.data.txt": DATA_MAGIC}
    for name, content in foreign.items():
        (tmp_path / name).write_bytes(content)
    save_onnx(model, path, external_data=True)
    assert sorted(os.listdir(tmp_path)) == sorted(["m.onnx", *foreign])
    assert onnx.load(path) == model


def test_save_external_too_large_even_without_initializers(rng, tmp_path, monkeypatch):
    """A skeleton (model without the initializers' raw data) over the limit: a clear error, no files."""
    from bnfold.onnx import io as load

    model = _mixed_model(rng)  # its Constant node holds 12 KB inline
    monkeypatch.setattr(load, "PROTO_LIMIT", 4096)
    path = tmp_path / "m.onnx"
    with pytest.raises(UnsupportedModelError, match="2 GiB.*external data"):
        load.save_onnx(model, path, external_data=True)
    assert os.listdir(tmp_path) == []


def test_save_external_failure_keeps_the_old_pair(rng, tmp_path, monkeypatch):
    from bnfold.onnx.io import save_onnx

    model_a, *_ = conv_bn(rng, big=True)
    model_b, *_ = conv_bn(rng, big=True)
    path = tmp_path / "m.onnx"
    save_onnx(model_a, path, external_data=True)
    before = {n: sha256(tmp_path / n) for n in os.listdir(tmp_path)}
    _fail_replace_onto(monkeypatch, path)
    with pytest.raises(BadInputError, match="No space"):  # a path bnfold cannot write: exit 3
        save_onnx(model_b, path, external_data=True)
    assert {n: sha256(tmp_path / n) for n in os.listdir(tmp_path)} == before


def test_save_external_keeps_tensors_already_external(rng, tmp_path):
    """A tensor still pointing at a file (never loaded) is copied as it is, not read."""
    from bnfold.onnx.io import save_onnx

    model, *_ = conv_bn(rng, big=True)
    w = next(t for t in model.graph.initializer if t.name == "w")
    (tmp_path / "w.bin").write_bytes(w.raw_data)
    w.ClearField("raw_data")
    w.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "w.bin"), ("offset", "0")):
        e = w.external_data.add()
        e.key, e.value = key, value
    save_onnx(model, tmp_path / "m.onnx", external_data=True)
    stored = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    assert next(t for t in stored.graph.initializer if t.name == "w") == w
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "w.bin"]  # nothing else was large enough


# ---- fold without calibration: the input file is the verification reference -----------------
@pytest.fixture
def spy(monkeypatch):
    """Records the paths fold saves models to and the reference verification runs against."""
    import bnfold.api as pipeline
    import bnfold.onnx.staging as staging

    seen = {"saved": [], "reference": []}
    real_stage, real_write, real_run = staging.stage_model, staging.write_onnx, pipeline._run_verification

    def stage(outputs, model, target, **kw):  # an output, staged for its target
        seen["saved"].append(os.path.basename(target))
        return real_stage(outputs, model, target, **kw)

    def write(model, path, **kw):  # a scratch copy (frozen.onnx, folded.onnx)
        seen["saved"].append(os.path.basename(path))
        return real_write(model, path, **kw)

    def run(reference, candidate, *a, **kw):
        seen["reference"].append(os.fspath(reference))
        return real_run(reference, candidate, *a, **kw)

    monkeypatch.setattr(staging, "stage_model", stage)
    monkeypatch.setattr(staging, "write_onnx", write)
    monkeypatch.setattr(pipeline, "_run_verification", run)
    return seen


def _save_external(model, src):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save(copy, src, save_as_external_data=True, all_tensors_to_one_file=True, location=src.name + ".data",
              size_threshold=0)


def test_fold_without_data_verifies_against_the_input_file(rng, tmp_path, spy):
    model, *_ = conv_bn(rng, big=True)
    src = tmp_path / "in" / "m.onnx"
    src.parent.mkdir()
    _save_external(model, src)
    before = {n: sha256(src.parent / n) for n in os.listdir(src.parent)}
    out, frozen = tmp_path / "out" / "f.onnx", tmp_path / "frozen" / "fr.onnx"
    res = fold(src, output=out, frozen_output=frozen)
    v = res.report.verification
    assert v.passed and [s.bn for s in v.sites] == ["bn"] and v.sites[0].passed
    assert spy["reference"] == [str(src)]
    assert spy["saved"] == ["fr.onnx", "f.onnx"]  # the frozen output is still written; no staged copy
    assert {n: sha256(src.parent / n) for n in os.listdir(src.parent)} == before
    # the frozen output is the input model, values and graph
    back, orig = onnx.load(frozen), onnx.load(src)
    assert back.graph.node == orig.graph.node
    assert {t.name: numpy_helper.to_array(t).tobytes() for t in back.graph.initializer} == \
        {t.name: numpy_helper.to_array(t).tobytes() for t in orig.graph.initializer}
    assert leftovers(tmp_path / "out") == [] and leftovers(tmp_path / "in") == []


def test_fold_without_data_inline_weights_uses_the_input_too(rng, tmp_path, spy):
    model, *_ = conv_bn(rng)
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    res = fold(src, output=tmp_path / "f.onnx")
    assert res.report.verification.passed and spy["reference"] == [str(src)] and spy["saved"] == ["f.onnx"]


@pytest.mark.parametrize("case", ["data", "proto", "ir14", "renamed", "changed"])
def test_frozen_copy_is_written_where_the_input_cannot_serve(rng, tmp_path, spy, monkeypatch, case):
    model, *_ = conv_bn(rng, ir_version=onnx.IR_VERSION if case == "ir14" else 10, big=True,
                        training=case == "data")
    if case == "renamed":
        for node in model.graph.node:
            node.name = ""
    if case == "ir14":  # an onnxruntime that refuses the input's IR (1.31 refuses 14; 1.32 takes it)
        refuse_newest_ir(monkeypatch)
    src = tmp_path / "m.onnx"
    _save_external(model, src)
    if case == "changed":  # the input is rewritten after it was read: it is no longer what was folded
        import bnfold.api as pipeline

        real_plan = pipeline.make_plan

        def plan_then_touch(*a, **kw):
            st = src.stat()
            os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
            return real_plan(*a, **kw)

        monkeypatch.setattr(pipeline, "make_plan", plan_then_touch)
    data = {"x": rand(rng, 6, 3, 5, 5)} if case == "data" else None
    res = fold(model if case == "proto" else src, output=tmp_path / "out" / "f.onnx", data=data, batch_size=None)
    v = res.report.verification
    assert v.passed
    assert spy["saved"] == ["frozen.onnx", "f.onnx"]
    assert os.path.basename(spy["reference"][0]) == "frozen.onnx"
    # fold-site results name the BNs as the report does
    assert [s.bn for s in v.sites] == [r.name for r in res.report.bns] and all(r.name for r in res.report.bns)


def test_unnamed_nodes_fold_sites_match_the_report(rng, tmp_path):
    """name_nodes renames unnamed nodes in memory only. The fold-site localisation matches tensor
    names, so it would find the sites against the input file too; but the sites would then carry the
    input's (empty) BN names, so the frozen copy is the reference and names agree with the report."""
    from bnfold.verification.engine import verify

    nodes, inits, cur, c = [], [], "x", 3
    for i in range(3):
        inits.append(init(f"w{i}", rand(rng, 4, c, 3, 3)))
        nodes.append(helper.make_node("Conv", [cur, f"w{i}"], [f"c{i}"], pads=[1] * 4))
        bn_node, bn_inits = bn("", f"c{i}", f"b{i}", bn_params(rng, 4), prefix=f"bn{i}")
        nodes += [bn_node]
        inits += bn_inits
        cur, c = f"b{i}", 4
    model = make_model(nodes, [vi("x", ["N", 3, 5, 5])], [vi(cur, 4)], inits)
    src, out = tmp_path / "m.onnx", tmp_path / "f.onnx"
    onnx.save(model, src)
    res = fold(src, output=out)
    names = [r.name for r in res.report.bns]
    assert len(set(names)) == 3 and all(names)
    assert [s.bn for s in res.report.verification.sites] == names
    # against the input file itself: the same three sites, same tensors, by the input's names
    direct = verify(src, out, [{"x": rand(rng, 1, 3, 5, 5)}])
    assert direct.passed
    assert [s.tensor for s in direct.sites] == [s.tensor for s in res.report.verification.sites]
    assert [s.bn for s in direct.sites] == ["", "", ""]


def test_model_before_folding_is_the_input_file(rng, tmp_path, monkeypatch):
    """What makes the input a valid reference: without calibration, nothing before the fold stage
    changes the model in memory (other than node names, and the IR version and producer fields
    that prepare_for_save sets, all checked separately)."""
    import shutil

    import bnfold.api as pipeline

    seen = []
    real_apply = pipeline.apply_plan

    def apply(work, *a, **kw):
        if kw.get("commit"):
            seen.append(work.model.graph.SerializeToString())
        return real_apply(work, *a, **kw)

    monkeypatch.setattr(pipeline, "apply_plan", apply)
    sample = tmp_path / "unfoldable.onnx"
    shutil.copyfile(os.path.join(os.path.dirname(__file__), "..", "sample_models", "unfoldable.onnx"), sample)
    model, *_ = conv_bn(rng, big=True)
    ext = tmp_path / "ext.onnx"
    _save_external(model, ext)
    for src in (sample, ext):
        seen.clear()
        fold(src, output=tmp_path / "out" / src.name)
        assert seen == [onnx.load(src).graph.SerializeToString()]


def test_model_too_large_for_one_protobuf_is_written_with_its_data(rng, tmp_path, monkeypatch):
    """An input without external data that cannot be written as one protobuf (over 2 GiB, simulated)
    is written with external data: the data file moves into place with the model."""
    from bnfold.onnx import io as load

    def too_large(model, fh, size_hint=None):
        raise ValueError("model is larger than protobuf's 2 GiB limit")

    monkeypatch.setattr(load, "write_model", too_large)
    model, *_ = conv_bn(rng, big=True)
    out = tmp_path / "out" / "f.onnx"
    res = fold(model, output=out)
    assert res.report.verification.passed
    assert res.report.output_sha256 == sha256(out)
    names = os.listdir(out.parent)
    assert len(names) == 2 and _external_info(onnx.load(out, load_external_data=False))
    x = {"x": rand(rng, 1, 3, 5, 5)}
    np.testing.assert_allclose(ort_run(out, x)[0], ort_run(model, x)[0], rtol=1e-4, atol=1e-4)


def test_frozen_output_is_the_reference_when_calibrating(rng, tmp_path, spy):
    """With data and frozen_output, the frozen model is written once (staged beside FROZEN) and
    verification runs against that staged file (no second copy); an output at the same path gets
    the folded model, the frozen one still written once."""
    model, *_ = conv_bn(rng, big=True, training=True)
    src = tmp_path / "m.onnx"
    _save_external(model, src)
    data = {"x": rand(rng, 6, 3, 5, 5)}
    frozen, out = tmp_path / "fr" / "frozen.onnx", tmp_path / "out" / "f.onnx"
    res = fold(src, output=out, frozen_output=frozen, data=data)
    assert res.report.verification.passed
    assert spy["saved"] == ["frozen.onnx", "f.onnx"]
    [reference] = spy["reference"]
    assert Path(reference).parent.parent == frozen.parent and Path(reference).parent.name.startswith(".bnfold-")
    # the frozen output really is the frozen (calibrated, unfolded) model
    assert count_op(onnx.load(frozen), "BatchNormalization") == 1
    y_ref = ort_run(frozen, {"x": data["x"][:2]})[0]
    np.testing.assert_allclose(ort_run(out, {"x": data["x"][:2]})[0], y_ref, rtol=1e-4, atol=1e-4)
    spy["saved"].clear()
    spy["reference"].clear()
    same = tmp_path / "same" / "m.onnx"
    fold(src, output=same, frozen_output=same, data=data)
    assert spy["saved"] == ["m.onnx", "m.onnx"]
    assert Path(spy["reference"][0]).parent.parent == same.parent
    assert count_op(onnx.load(same), "BatchNormalization") == 0  # the folded model, registered last
    assert leftovers(same.parent) == []
