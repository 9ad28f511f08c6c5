"""bnfold.verification: sessions, tolerances, comparison and end-to-end verification of tiny models."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.errors import BadInputError, ProviderUnavailable, UnsupportedModelError
from bnfold.onnx.runtime import input_specs, make_session, ort_max_ir_version
from bnfold.verification.compare import compare_outputs, verify_models
from bnfold.verification.tolerances import DEFAULT_TOLERANCES
from bnfold.verification.tolerances import dtype_tolerance as tolerance_for

OPSET = 17
EPS = 1e-5
C_IN, C_OUT, H, W = 3, 4, 8, 8


def _model(nodes, inputs, outputs, initializers) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=initializers)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=ort_max_ir_version()
    )
    onnx.checker.check_model(model)
    return model


def _x_info(name="x"):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", C_IN, H, W])


def _y_info(name="y"):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", C_OUT, H, W])


@pytest.fixture(scope="module")
def params():
    rng = np.random.default_rng(0)
    return {
        "W": rng.standard_normal((C_OUT, C_IN, 3, 3)).astype(np.float32),
        "B": rng.standard_normal(C_OUT).astype(np.float32),
        "scale": rng.uniform(0.5, 2.0, C_OUT).astype(np.float32),
        "beta": rng.standard_normal(C_OUT).astype(np.float32),
        "mean": rng.standard_normal(C_OUT).astype(np.float32),
        "var": rng.uniform(0.5, 2.0, C_OUT).astype(np.float32),
    }


def conv_bn_model(p) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(v, k) for k, v in p.items()]
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node(
            "BatchNormalization", ["c", "scale", "beta", "mean", "var"], ["y"], epsilon=EPS, name="bn"
        ),
    ]
    return _model(nodes, [_x_info()], [_y_info()], inits)


def folded_weights(p) -> tuple[np.ndarray, np.ndarray]:
    k = p["scale"].astype(np.float64) / np.sqrt(p["var"].astype(np.float64) + EPS)
    w = p["W"].astype(np.float64) * k[:, None, None, None]
    b = (p["B"].astype(np.float64) - p["mean"]) * k + p["beta"]
    return w.astype(np.float32), b.astype(np.float32)


def conv_model(w, b, extra_output: bool = False) -> onnx.ModelProto:
    nodes = [helper.make_node("Conv", ["x", "Wf", "Bf"], ["y"], pads=[1, 1, 1, 1], name="conv")]
    outputs = [_y_info()]
    if extra_output:
        nodes.append(helper.make_node("Relu", ["y"], ["z"], name="relu"))
        outputs.append(_y_info("z"))
    inits = [numpy_helper.from_array(w, "Wf"), numpy_helper.from_array(b, "Bf")]
    return _model(nodes, [_x_info()], outputs, inits)


def batches(n=4, seed=1):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, C_IN, H, W)).astype(np.float32)} for _ in range(n)]


@pytest.fixture()
def ref_path(tmp_path, params):
    path = tmp_path / "frozen.onnx"
    onnx.save(conv_bn_model(params), path)
    return path


# ---------------------------------------------------------------------------------------------
# sessions
# ---------------------------------------------------------------------------------------------


def test_ort_max_ir_version_loads():
    ir = ort_max_ir_version()
    assert 3 <= ir <= onnx.IR_VERSION
    assert ort_max_ir_version() is ir or ort_max_ir_version() == ir  # cached


def test_model_saved_with_max_ir_loads(ref_path):
    assert onnx.load(ref_path).ir_version == ort_max_ir_version()
    sess = make_session(ref_path)
    out = sess.run(None, batches(1)[0])[0]
    assert out.shape == (1, C_OUT, H, W)


def test_session_optimisations_off_by_default(ref_path):
    import onnxruntime as ort

    assert (
        make_session(ref_path).get_session_options().graph_optimization_level
        == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    assert (
        make_session(ref_path, optimize=True).get_session_options().graph_optimization_level
        == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    )
    assert make_session(ref_path).get_providers() == ["CPUExecutionProvider"]


def test_cuda_unavailable_raises(ref_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():  # pragma: no cover
        pytest.skip("this machine has a CUDA onnxruntime")
    with pytest.raises(ProviderUnavailable, match="CUDA") as info:
        make_session(ref_path, provider="cuda")
    assert "onnxruntime-gpu" in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_provider_and_missing_file(tmp_path, ref_path):
    with pytest.raises(BadInputError, match="provider"):
        make_session(ref_path, provider="tpu")
    with pytest.raises(BadInputError, match="not found"):
        make_session(tmp_path / "nope.onnx")


def test_load_failure_is_one_line(tmp_path, params):
    model = conv_bn_model(params)
    model.ir_version = ort_max_ir_version() + 1
    path = tmp_path / "too_new.onnx"
    onnx.save(model, path)
    with pytest.raises(UnsupportedModelError) as info:
        make_session(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert "IR version" in msg and str(path) in msg
    assert "onnxruntime_src" not in msg  # C++ source location stripped

    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf")
    with pytest.raises(UnsupportedModelError, match="cannot load"):
        make_session(garbage)


def test_external_data_from_other_cwd(tmp_path, params, monkeypatch):
    sub = tmp_path / "model"
    sub.mkdir()
    path = sub / "ext.onnx"
    onnx.save(
        conv_bn_model(params),
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="w.bin",
        size_threshold=0,
    )
    assert (sub / "w.bin").exists()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    feed = batches(1)[0]
    expected = make_session(path).run(None, feed)[0]
    # relative path from another directory, too
    rel = os.path.join("..", "model", "ext.onnx")
    got = make_session(rel).run(None, feed)[0]
    np.testing.assert_array_equal(expected, got)
    assert np.isfinite(expected).all() and expected.shape == (1, C_OUT, H, W)


def test_input_specs_skips_initializers():
    w = numpy_helper.from_array(np.ones((2, 2), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Identity", ["k"], ["z"])],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [2, 2]),  # old-IR style
            helper.make_tensor_value_info("k", TensorProto.INT64, None),  # unknown rank
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2]),
            helper.make_tensor_value_info("z", TensorProto.INT64, None),
        ],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=3)
    specs = input_specs(model)
    assert [s.name for s in specs] == ["x", "k"]
    assert specs[0].dtype == np.float32 and specs[0].shape == (None, 2)
    assert specs[1].dtype == np.int64 and specs[1].shape is None


# ---------------------------------------------------------------------------------------------
# compare_outputs
# ---------------------------------------------------------------------------------------------


def test_default_tolerances():
    assert DEFAULT_TOLERANCES["float32"] == (1e-4, 1e-4)
    assert tolerance_for("float16") == (1e-2, 1e-2)
    assert tolerance_for("bfloat16") == (5e-2, 5e-2)
    assert tolerance_for("float64") == (1e-9, 1e-9)
    assert tolerance_for("int64") == (0.0, 0.0)


def test_compare_within_and_beyond_tolerance():
    ref = np.array([1.0, 2.0, -3.0], np.float32)
    ok = ref + np.float32(5e-5)
    bad = ref.copy()
    bad[2] += 1e-2
    [e] = compare_outputs({"y": ref}, {"y": ok}, {"y": "float32"})
    assert e.passed and e.atol == 1e-4 and e.rtol == 1e-4
    [e] = compare_outputs({"y": ref}, {"y": bad}, {"y": "float32"})
    assert not e.passed
    assert e.max_abs == pytest.approx(1e-2, rel=1e-3)
    assert e.max_rel == pytest.approx(1e-2 / 3, rel=1e-3)
    # explicit tolerance overrides the dtype default
    [e] = compare_outputs({"y": ref}, {"y": bad}, {"y": "float32"}, atol=2e-2, rtol=0.0)
    assert e.passed and e.atol == 2e-2 and e.rtol == 0.0


def test_compare_nan_positions():
    ref = np.array([1.0, np.nan, 3.0])
    same = np.array([1.0, np.nan, 3.0])
    moved = np.array([np.nan, 2.0, 3.0])
    [e] = compare_outputs({"y": ref}, {"y": same}, {"y": "float64"})
    assert e.passed and e.max_abs == 0.0
    [e] = compare_outputs({"y": ref}, {"y": moved}, {"y": "float64"})
    assert not e.passed
    [e] = compare_outputs({"y": ref}, {"y": np.array([1.0, 2.0, 3.0])}, {"y": "float64"})
    assert not e.passed


def test_compare_infinities():
    ref = np.array([np.inf, -np.inf, 1.0], np.float32)
    [e] = compare_outputs({"y": ref}, {"y": ref.copy()}, {"y": "float32"})
    assert e.passed and e.max_abs == 0.0
    big = np.array([3e38, -np.inf, 1.0], np.float32)  # finite vs inf: never "within inf bound"
    [e] = compare_outputs({"y": ref}, {"y": big}, {"y": "float32"})
    assert not e.passed and e.max_abs == np.inf


def test_compare_int_and_bool_exact():
    ref = np.array([1, 2, 3], np.int64)
    [e] = compare_outputs({"i": ref}, {"i": ref.copy()}, {"i": "int64"}, atol=10, rtol=10)
    assert e.passed and e.atol == 0.0 and e.rtol == 0.0
    [e] = compare_outputs({"i": ref}, {"i": ref + np.array([0, 0, 1])}, {"i": "int64"}, atol=10)
    assert not e.passed and e.max_abs == 1.0
    b = np.array([True, False])
    [e] = compare_outputs({"b": b}, {"b": ~b}, {"b": "bool"})
    assert not e.passed


def test_compare_relative_error_guarded_near_zero():
    ref = np.array([0.0, 1e-30, 1.0], np.float32)
    cand = np.array([5e-5, 2e-30, 1.0], np.float32)
    [e] = compare_outputs({"y": ref}, {"y": cand}, {"y": "float32"})
    assert e.passed
    assert e.max_abs == pytest.approx(5e-5, rel=1e-3)
    # near-zero references are divided by the guard max(atol, tiny) = 1e-4, not by |ref|
    assert e.max_rel == pytest.approx(5e-5 / 1e-4, rel=1e-3)
    assert np.isfinite(e.max_rel)


def test_compare_shape_mismatch_and_missing_output():
    ref = {"y": np.zeros((2, 3), np.float32), "z": np.zeros(2, np.float32)}
    cand = {"y": np.zeros((3, 2), np.float32)}
    ey, ez = compare_outputs(ref, cand, {"y": "float32", "z": "float32"})
    assert not ey.passed and ey.max_abs == np.inf
    assert not ez.passed and ez.name == "z"


def test_compare_float16_default_and_dtype_fallback():
    ref = np.array([1.0, 2.0], np.float16)
    cand = ref + np.float16(5e-3)
    [e] = compare_outputs({"y": ref}, {"y": cand}, {})  # dtype taken from the array
    assert e.dtype == "float16" and e.passed and e.atol == 1e-2


# ---------------------------------------------------------------------------------------------
# verify_models end to end
# ---------------------------------------------------------------------------------------------


def test_exact_fold_passes(tmp_path, ref_path, params):
    w, b = folded_weights(params)
    cand = tmp_path / "folded.onnx"
    onnx.save(conv_model(w, b), cand)
    result = verify_models(ref_path, cand, batches(4))
    assert result.passed, result
    assert result.provider == "cpu" and result.samples == 4
    assert [o.name for o in result.outputs] == ["y"]
    assert result.outputs[0].dtype == "float32"
    assert result.max_abs < 1e-5


def test_perturbed_weight_fails(tmp_path, ref_path, params):
    w, b = folded_weights(params)
    delta = 1e-2
    o, i, kh, kw = 2, 1, 0, 2
    w = w.copy()
    w[o, i, kh, kw] += delta
    cand = tmp_path / "bad.onnx"
    onnx.save(conv_model(w, b), cand)
    data = batches(4)
    result = verify_models(ref_path, cand, data)
    assert not result.passed
    # the perturbation changes output channel o by delta * x[i] shifted by the tap (pads 1)
    effect = 0.0
    for batch in data:
        xpad = np.pad(batch["x"][0, i].astype(np.float64), 1)
        effect = max(effect, delta * np.abs(xpad[kh : kh + H, kw : kw + W]).max())
    assert result.max_abs == pytest.approx(effect, rel=1e-2)
    assert not result.outputs[0].passed


def test_output_names_must_match(tmp_path, ref_path, params):
    w, b = folded_weights(params)
    cand = tmp_path / "extra.onnx"
    onnx.save(conv_model(w, b, extra_output=True), cand)
    with pytest.raises(BadInputError, match="different outputs"):
        verify_models(ref_path, cand, batches(1))


def test_verify_bad_batches(tmp_path, ref_path):
    with pytest.raises(BadInputError, match="no verification inputs"):
        verify_models(ref_path, ref_path, [])
    with pytest.raises(BadInputError, match="lacks model input"):
        verify_models(ref_path, ref_path, [{"other": np.zeros((1, C_IN, H, W), np.float32)}])
    with pytest.raises(BadInputError, match="cannot run the reference"):
        verify_models(ref_path, ref_path, [{"x": np.zeros((1, C_IN + 1, H, W), np.float32)}])
