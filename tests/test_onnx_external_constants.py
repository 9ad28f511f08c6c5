"""External data of Constant nodes (and any tensor outside the initializers) resolves against the
model's folder, never the current folder; a model in memory whose tensors were never loaded is
refused instead of being read from wherever the process happens to run."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_run import run_cli
from conftest import bn_params, ort_run, rand
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.errors import BadInputError

W = np.full((4, 3, 1, 1), 2.0, np.float32)
DECOY = W * 100


def _model(folder: Path, rng: np.random.Generator) -> tuple[Path, dict[str, np.ndarray]]:
    """x -> Conv(weight from a Constant node whose tensor is in 'w.bin') -> BN -> y."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "w.bin").write_bytes(W.tobytes())
    t = numpy_helper.from_array(W, "wc")
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "w.bin"), ("offset", "0"), ("length", str(W.nbytes))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    p = bn_params(rng, 4)
    names = [f"bn.{k}" for k in ("scale", "bias", "mean", "var")]
    inits = [numpy_helper.from_array(p[k], n) for k, n in zip(("scale", "bias", "mean", "var"), names)]
    nodes = [helper.make_node("Constant", [], ["w"], name="c", value=t),
             helper.make_node("Conv", ["x", "w"], ["z"], name="conv"),
             helper.make_node("BatchNormalization", ["z", *names], ["y"], name="bn")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 4, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    path = folder / "m.onnx"
    onnx.save(model, path)
    return path, p


def _expected(x: np.ndarray, p: dict[str, np.ndarray]) -> np.ndarray:
    z = np.einsum("oc,nchw->nohw", W[:, :, 0, 0].astype(np.float64), x.astype(np.float64))
    s = p["scale"] / np.sqrt(p["var"].astype(np.float64) + 1e-5)
    return s[None, :, None, None] * (z - p["mean"][None, :, None, None]) + p["bias"][None, :, None, None]


def test_fold_reads_the_constant_from_the_model_folder_not_the_current_one(
        tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    path, p = _model(tmp_path / "model", rng)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "w.bin").write_bytes(DECOY.tobytes())  # a different w.bin where bnfold runs
    monkeypatch.chdir(elsewhere)
    res = bnfold.fold(path, output=tmp_path / "out" / "f.onnx")
    assert res.ok and res.report.folded == 1
    x = rand(rng, 2, 3, 4, 4)
    np.testing.assert_allclose(ort_run(tmp_path / "out" / "f.onnx", {"x": x})[0], _expected(x, p),
                               rtol=1e-4, atol=1e-4)
    assert [r.decision.target for r in bnfold.inspect(path)] == ["conv"]


def test_cli_from_another_folder_agrees_and_a_missing_file_is_exit_3(tmp_path: Path, rng: np.random.Generator) -> None:
    path, _ = _model(tmp_path / "model", rng)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "w.bin").write_bytes(DECOY.tobytes())
    ok = run_cli("fold", path, "-o", tmp_path / "a.onnx", "--no-repro", cwd=elsewhere)
    assert ok.returncode == 0, ok.stderr
    (tmp_path / "model" / "w.bin").unlink()
    bad = run_cli("fold", path, "-o", tmp_path / "b.onnx", "--no-repro", cwd=elsewhere)
    assert bad.returncode == 3, bad.stderr
    line = bad.stderr.strip()
    assert line.startswith("bnfold: error: external data of") and "\n" not in line
    assert not (tmp_path / "b.onnx").exists()


def test_a_model_in_memory_with_unloaded_external_data_is_refused(
        tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = _model(tmp_path / "model", rng)
    model = onnx.load(str(path), load_external_data=False)
    monkeypatch.chdir(tmp_path / "model")  # even where a w.bin lies, bnfold does not guess the folder
    with pytest.raises(BadInputError, match="'wc' is stored in external data .*w.bin.* not loaded"):
        bnfold.fold(model, verify=False)
    loaded = onnx.load(str(path))  # onnx reads the data: then the model in memory folds
    assert bnfold.fold(loaded, verify=False).report.folded == 1
