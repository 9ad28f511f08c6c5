"""Issue 15 point 4: models whose inputs have dynamic non-batch dims are verified by default.

Before, ``bnfold fold MODEL -o OUT`` on an ``[N, 3, ?, ?]`` model printed "verification skipped: input
'x' has dynamic dimensions", wrote the model unchecked and exited 0, and ``bnfold verify`` exited 3.
Now the shape comes from ``--input-shape`` / ``input_shapes``, the model's metadata, a probe size it
runs at, or a size its layers fix (``bnfold/verification/shapes.py``), and the report says which.
Real onnx models, real onnxruntime; no mocks.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from cli_run import run_cli
from conftest import INT64, bn, bn_params, init, make_model, vi
from onnx import helper, numpy_helper

import bnfold
from bnfold.errors import BadInputError
from bnfold.onnx.runtime import input_specs
from bnfold.verification import shapes as shapes_module
from bnfold.verification.feeds import fold_feeds, index_bounds
from bnfold.verification.shape_spec import normalize_input_shapes, parse_input_shape
from bnfold.verification.shapes import MAX_RUNS, PROBE_SIZES, choose_shapes


def _conv_bn(tail: str = "relu", *, stride: int = 1, metadata: dict[str, str] | None = None) -> onnx.ModelProto:
    """x [n, 3, h, w] -> Conv(3->4, 3x3, pad 1, ``stride``) -> inference BN -> ``tail``:
    ``relu``; ``gemm`` (Flatten, Gemm with K = 4*10*10: only h = w = 20 at stride 2 fits, or 19);
    ``reshape`` (Reshape to the constant [0, 400]: h = w = 10 at stride 1, no -1 to solve for)."""
    rng = np.random.default_rng(0)
    node, inits = bn("bn", "c", "b", bn_params(rng, 4))
    conv = helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1], strides=[stride, stride])
    nodes = [conv, node]
    extra = [init("w", rng.standard_normal((4, 3, 3, 3)).astype(np.float32))]
    if tail == "relu":
        nodes.append(helper.make_node("Relu", ["b"], ["y"]))
        out = vi("y", ["n", 4, "h2", "w2"])
    elif tail == "gemm":
        nodes += [helper.make_node("Flatten", ["b"], ["f"]), helper.make_node("Gemm", ["f", "g"], ["y"], transB=1)]
        extra.append(init("g", rng.standard_normal((10, 4 * 10 * 10)).astype(np.float32)))
        out = vi("y", ["n", 10])
    else:
        nodes.append(helper.make_node("Reshape", ["b", "s"], ["y"]))
        extra.append(init("s", np.array([0, 400], np.int64)))
        out = vi("y", ["n", 400])
    model = make_model(nodes, [vi("x", ["n", 3, "h", "w"])], [out], [*extra, *inits])
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    return model


def _save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def _shapes(report: dict[str, Any]) -> dict[str, Any]:
    shapes: dict[str, Any] = report["verification"]["inputs"]["shapes"]
    return shapes


# ---- fold: verified by default ----------------------------------------------------------------


def test_fold_verifies_a_dynamic_conv_net_at_the_first_probe_size(tmp_path: Path) -> None:
    model = _save(_conv_bn(), tmp_path / "m.onnx")
    report = tmp_path / "r.json"
    proc = run_cli("fold", model, "-o", tmp_path / "out.onnx", "--report", report)
    assert proc.returncode == 0, proc.stderr
    assert "Verified at x: 1x3x224x224 (probe)" in proc.stdout
    assert "skipped" not in proc.stdout + proc.stderr
    data = json.loads(report.read_text(encoding="utf-8"))
    assert data["warnings"] == []
    assert data["verification"]["passed"] is True
    assert _shapes(data) == {"x": {"shape": [1, 3, 224, 224], "source": "probe"}}
    # the sha256 recorded is that of 4 samples at 224x224: the feeds really were that shape
    feeds = fold_feeds(None, _conv_bn(), 4, {"x": (1, 3, 224, 224)})
    assert isinstance(feeds, list) and feeds[0]["x"].shape == (1, 3, 224, 224)
    digest = hashlib.sha256()
    for f in feeds:
        digest.update(np.ascontiguousarray(f["x"]).tobytes())
    assert data["verification"]["inputs"]["sha256"]["x"] == digest.hexdigest()


@pytest.mark.parametrize(("tail", "stride", "sizes"), [
    ("gemm", 2, {19, 20}),  # ceil(h/2) = 10 after the stride-2 Conv; Gemm's K = 400 fixes it
    ("reshape", 1, {10}),  # Reshape to [0, 400]: 4*h*w = 400
])
def test_fold_finds_the_size_a_downstream_layer_fixes(tmp_path: Path, tail: str, stride: int,
                                                      sizes: set[int]) -> None:
    result = bnfold.fold(_conv_bn(tail, stride=stride), output=tmp_path / "out.onnx")
    v = result.report.verification
    assert v is not None and v.passed
    record = v.inputs["shapes"]["x"]
    assert record["source"] == "inferred"
    assert record["shape"][:2] == [1, 3] and record["shape"][2] == record["shape"][3] and record["shape"][2] in sizes
    assert (tmp_path / "out.onnx").exists()


def test_a_fold_of_a_fixed_size_model_is_checked_for_real(tmp_path: Path) -> None:
    """The verification at the inferred size is a real one: a wrong channel in the folded Conv fails."""
    frozen, folded = tmp_path / "frozen.onnx", tmp_path / "folded.onnx"
    bnfold.fold(_conv_bn("gemm", stride=2), output=folded, frozen_output=frozen)
    bad = onnx.load(folded)
    w = next(t for t in bad.graph.initializer if numpy_helper.to_array(t).shape == (4, 3, 3, 3))
    arr = numpy_helper.to_array(w).copy()
    arr[2] *= 1.001  # one channel's scale off by 1e-3
    w.CopyFrom(numpy_helper.from_array(arr, w.name))
    _save(bad, tmp_path / "bad.onnx")
    proc = run_cli("verify", frozen, tmp_path / "bad.onnx", "--no-repro")
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "(inferred)" in proc.stdout


@pytest.mark.parametrize(("key", "value", "shape"), [
    ("imgsz", "[96, 128]", [1, 3, 96, 128]),  # Ultralytics' metadata
    ("imgsz", "64", [1, 3, 64, 64]),
    ("input_shapes", "x:1x3x48x80", [1, 3, 48, 80]),
    ("input_shape", "[1,3,40,56]", [1, 3, 40, 56]),  # a bare shape names the one dynamic input
])
def test_fold_takes_the_shape_from_the_model_metadata(tmp_path: Path, key: str, value: str,
                                                     shape: list[int]) -> None:
    result = bnfold.fold(_conv_bn(metadata={key: value}), output=tmp_path / "out.onnx")
    v = result.report.verification
    assert v is not None and v.passed
    assert v.inputs["shapes"] == {"x": {"shape": shape, "source": "metadata"}}


def test_a_metadata_hint_that_does_not_fit_falls_back_to_the_probe(tmp_path: Path) -> None:
    model = _conv_bn(metadata={"input_shapes": "x:1x5x48x80"})  # 5 channels: not this model's 3
    v = bnfold.fold(model, output=tmp_path / "out.onnx").report.verification
    assert v is not None and v.inputs["shapes"]["x"] == {"shape": [1, 3, 224, 224], "source": "probe"}


def test_two_dynamic_inputs_are_probed_together(tmp_path: Path) -> None:
    """x [n,3,h,w] and z [n,4,h,w] added after the Conv: both get the probe size."""
    rng = np.random.default_rng(1)
    node, inits = bn("bn", "c", "b", bn_params(rng, 4))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]), node,
             helper.make_node("Add", ["b", "z"], ["y"])]
    model = make_model(nodes, [vi("x", ["n", 3, "h", "w"]), vi("z", ["n", 4, "h", "w"])], [vi("y", ["n", 4, "h", "w"])],
                       [init("w", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)), *inits])
    report = tmp_path / "r.json"
    proc = run_cli("fold", _save(model, tmp_path / "m.onnx"), "-o", tmp_path / "out.onnx", "--report", report)
    assert proc.returncode == 0, proc.stderr
    assert "Verified at x: 1x3x224x224 (probe), z: 1x4x224x224 (probe)" in proc.stdout
    assert _shapes(json.loads(report.read_text(encoding="utf-8")))["z"] == {"shape": [1, 4, 224, 224],
                                                                            "source": "probe"}


def test_inputs_at_different_sizes_need_input_shape(tmp_path: Path) -> None:
    """z is added after a stride-2 Conv: no single size of at least SCAN_MIN fits both inputs (the
    probe sets every dynamic dim to one size; only 1x1 would), so fold exits 3 naming --input-shape;
    given shapes verify it."""
    rng = np.random.default_rng(2)
    node, inits = bn("bn", "c", "b", bn_params(rng, 4))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1], strides=[2, 2]), node,
             helper.make_node("Add", ["b", "z"], ["y"])]
    model = make_model(nodes, [vi("x", ["n", 3, "h", "w"]), vi("z", ["n", 4, "h2", "w2"])],
                       [vi("y", ["n", 4, "h2", "w2"])],
                       [init("w", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)), *inits])
    path = _save(model, tmp_path / "m.onnx")
    proc = run_cli("fold", path, "-o", tmp_path / "out.onnx")
    assert proc.returncode == 3
    assert "pass --input-shape x:1x3xHxW" in proc.stderr and not (tmp_path / "out.onnx").exists()
    proc = run_cli("fold", path, "-o", tmp_path / "out.onnx", "--input-shape", "x:1x3x64x64",
                   "--input-shape", "z:1x4x32x32")
    assert proc.returncode == 0, proc.stderr
    assert "Verified at x: 1x3x64x64 (given), z: 1x4x32x32 (given)" in proc.stdout


def test_no_shape_works_is_exit_3_with_the_fix_and_nothing_written(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    node, inits = bn("bn", "c", "b", bn_params(rng, 4))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]), node,
             helper.make_node("Reshape", ["b", "s"], ["y"])]  # 4*h*w = 7 has no solution
    model = make_model(nodes, [vi("x", ["n", 3, "h", "w"])], [vi("y", [1, 7])],
                       [init("w", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)), *inits,
                        init("s", np.array([1, 7], np.int64))], check=False)
    proc = run_cli("fold", _save(model, tmp_path / "m.onnx"), "-o", tmp_path / "out.onnx")
    assert proc.returncode == 3
    assert proc.stderr.startswith("bnfold: error: no input shape found for 'x'")
    assert proc.stderr.rstrip().endswith("pass --input-shape x:1x3xHxW, the shape it runs at")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "out.onnx").exists()
    # --no-verify is the one way to write it unchecked
    proc = run_cli("fold", tmp_path / "m.onnx", "-o", tmp_path / "out.onnx", "--no-verify")
    assert proc.returncode == 0 and (tmp_path / "out.onnx").exists()
    assert "Verification: not run" in proc.stdout


def test_the_scan_is_capped_in_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no time left the scan stops at its first size and says so."""
    monkeypatch.setattr(shapes_module, "SCAN_SECONDS", 0.0)
    rng = np.random.default_rng(0)
    node, inits = bn("bn", "c", "b", bn_params(rng, 4))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]), node,
             helper.make_node("Reshape", ["b", "s"], ["y"])]
    model = make_model(nodes, [vi("x", ["n", 3, "h", "w"])], [vi("y", [1, 7])],
                       [init("w", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)), *inits,
                        init("s", np.array([1, 7], np.int64))], check=False)
    # the scan's first size not among the probe sizes (32..256 are): 288
    with pytest.raises(BadInputError, match=r"the scan stopped after 0 s, at 1x3x288x288\)"):
        choose_shapes(model, input_specs(model), given={}, batch=1, run=None)


def test_onnxruntime_tries_are_capped_and_reported() -> None:
    """A model strict shape inference accepts at every size but onnxruntime never runs: MAX_RUNS
    tries, then the error lists them with onnxruntime's reason."""
    model = _conv_bn()
    calls: list[dict[str, tuple[int, ...]]] = []

    def run(shapes: dict[str, tuple[int, ...]]) -> str:
        calls.append(shapes)
        return "refused"

    with pytest.raises(BadInputError) as exc:
        choose_shapes(model, input_specs(model), given={}, batch=1, run=run)
    assert len(calls) == MAX_RUNS
    assert [c["x"][2] for c in calls] == list(PROBE_SIZES[:MAX_RUNS])
    assert "tried x: 1x3x224x224 (probe); x: 1x3x256x256 (probe)" in str(exc.value)
    assert "last error: refused" in str(exc.value)


# ---- --input-shape / input_shapes ---------------------------------------------------------------


def test_fold_api_takes_input_shapes(tmp_path: Path) -> None:
    for given in ({"x": (1, 3, 64, 48)}, {"x": "1x3x64x48"}, ["x:1x3x64x48"]):
        v = bnfold.fold(_conv_bn(), output=tmp_path / "out.onnx", input_shapes=given).report.verification
        assert v is not None and v.passed
        assert v.inputs["shapes"] == {"x": {"shape": [1, 3, 64, 48], "source": "given"}}


def test_verify_probes_and_takes_input_shape(tmp_path: Path) -> None:
    """``bnfold verify`` on a dynamic model exited 3 ('random inputs need static shapes')."""
    frozen, folded = tmp_path / "frozen.onnx", tmp_path / "folded.onnx"
    bnfold.fold(_conv_bn(), output=folded, frozen_output=frozen)
    proc = run_cli("verify", frozen, folded)
    assert proc.returncode == 0, proc.stderr
    assert "Verified at x: 1x3x224x224 (probe)" in proc.stdout
    report = tmp_path / "v.json"
    proc = run_cli("verify", frozen, folded, "--input-shape", "x:2x3x32x40", "--report", report)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text(encoding="utf-8"))
    assert _shapes(data) == {"x": {"shape": [2, 3, 32, 40], "source": "given"}}
    assert data["verification"]["samples"] == 2
    result = bnfold.verify(frozen, folded, input_shapes={"x": (1, 3, 16, 16)})
    assert result.passed and result.inputs["shapes"]["x"]["shape"] == [1, 3, 16, 16]


@pytest.mark.parametrize(("spec", "code", "message"), [
    ("x:1x3xAx5", 2, "is not a shape"),
    ("1x3x5x5", 2, "has no NAME"),
    ("x:1x3x0x5", 2, "at least 1"),
    ("y:1x3x8x8", 3, "input shape given for 'y', which is not a model input; its inputs are 'x'"),
    ("x:1x3x8", 3, "input 'x' has rank 4 (1x3xHxW), the shape given for it 1x3x8 has rank 3"),
    ("x:1x5x8x8", 3, "input 'x' has a static dim 1 of 3; the shape given for it 1x5x8x8 says 5"),
])
def test_bad_input_shapes(tmp_path: Path, spec: str, code: int, message: str) -> None:
    model = _save(_conv_bn(), tmp_path / "m.onnx")
    proc = run_cli("fold", model, "-o", tmp_path / "out.onnx", "--input-shape", spec)
    assert proc.returncode == code, proc.stderr
    assert message in proc.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_input_shape_with_data_in_verify_is_a_usage_error(tmp_path: Path) -> None:
    model = _save(_conv_bn(), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 8, 8), np.float32))
    proc = run_cli("verify", model, model, "--data", tmp_path / "x.npy", "--input-shape", "x:1x3x8x8")
    assert proc.returncode == 2 and "--input-shape applies to random inputs" in proc.stderr


def test_input_shape_spellings() -> None:
    assert parse_input_shape("x:1x3x640x640") == ("x", (1, 3, 640, 640))
    assert parse_input_shape("x:[1,3,640,640]") == ("x", (1, 3, 640, 640))
    assert parse_input_shape("a:b:1,2") == ("a:b", (1, 2))  # the last colon separates
    assert parse_input_shape("s:[]") == ("s", ())
    assert normalize_input_shapes(["x:1x2", "y:3"]) == {"x": (1, 2), "y": (3,)}
    with pytest.raises(BadInputError, match="given twice"):
        normalize_input_shapes(["x:1x2", "x:1x3"])
    with pytest.raises(BadInputError, match="positive integers"):
        normalize_input_shapes({"x": (1, 2.5)})


# ---- integer inputs ---------------------------------------------------------------------------


def _embedding_model(rows: int) -> onnx.ModelProto:
    """ids [n, L] int64 -> Gather from a [rows, 8] table -> Transpose to [n, 8, L] -> BN."""
    rng = np.random.default_rng(3)
    node, inits = bn("bn", "t", "y", bn_params(rng, 8))
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["e"]), helper.make_node("Transpose", ["e"], ["t"],
                                                                                   perm=[0, 2, 1]), node]
    return make_model(nodes, [vi("ids", ["n", "L"], INT64)], [vi("y", ["n", 8, "L"])],
                      [init("emb", rng.standard_normal((rows, 8)).astype(np.float32)), *inits])


def test_integer_inputs_index_their_embedding_table(tmp_path: Path) -> None:
    """Before: 'verification skipped: input 'ids' is an integer input'. Now integers in
    {0, ..., rows - 1} (the table a Gather indexes with them), verified at a probed length."""
    model = _embedding_model(50)
    assert index_bounds(model) == {"ids": 49}
    feeds = fold_feeds(None, model, 4, {"ids": (1, 224)})
    assert isinstance(feeds, list)
    values = np.concatenate([f["ids"] for f in feeds])
    assert values.min() == 0 and values.max() == 49  # the whole table is used, nothing outside it
    v = bnfold.fold(model, output=tmp_path / "out.onnx").report.verification
    assert v is not None and v.passed
    assert v.inputs["shapes"] == {"ids": {"shape": [1, 224], "source": "probe"}}


def test_integer_inputs_without_a_table_are_zeros_and_ones() -> None:
    model = make_model([helper.make_node("Identity", ["m"], ["y"])], [vi("m", ["n", 6], INT64)],
                       [vi("y", ["n", 6], INT64)])
    assert index_bounds(model) == {}
    feeds = fold_feeds(None, model, 8)
    assert isinstance(feeds, list)
    assert set(np.unique(np.concatenate([f["m"] for f in feeds])).tolist()) == {0, 1}
