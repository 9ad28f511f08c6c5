"""Large external tensors left in their data file at load (``bnfold/onnx/deferred.py``): never read
unless a value is needed, copied byte for byte in chunks when a model is written, refused when the
file changed since load, and held to onnx's containment rules. The threshold is lowered here
(``DEFER_MIN_BYTES``) so that small files exercise it."""
from __future__ import annotations

import gc
import os
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import FLOAT, INT64, bn, bn_params, init, make_model, rand, vi
from onnx import helper

import bnfold
from bnfold.errors import BadInputError
from bnfold.graph.constants import tensor_to_array
from bnfold.onnx import deferred
from bnfold.onnx.io import load_onnx, save_onnx

ROWS, COLS = 4096, 64  # a 1 MiB float32 table
C = 4
SMALL = 64 * 1024  # the threshold in these tests: the table and nothing else is deferred


@pytest.fixture
def small_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deferred, "DEFER_MIN_BYTES", SMALL)
    monkeypatch.setattr(deferred, "COPY_CHUNK", 16 * 1024)


def _model(rng: np.random.Generator, *, training: bool = False) -> tuple[onnx.ModelProto, np.ndarray]:
    """x -> Conv -> BN -> Add(Gather(table, pick) reshaped) -> y; the table is the large tensor.
    ``training``: a training-mode BN after the Add instead, so the calibration network needs the table."""
    table = rand(rng, ROWS, COLS)
    w = rand(rng, C, 3, 3, 3, scale=0.3)
    gather = [helper.make_node("Gather", ["table", "pick"], ["rows"], name="gather", axis=0),
              helper.make_node("Reshape", ["rows", "shape"], ["rows4"], name="reshape")]
    conv = helper.make_node("Conv", ["x", "w"], ["z"], name="conv", pads=[1, 1, 1, 1])
    if training:
        node, bn_inits = bn("bn", "s", "y", bn_params(rng, C), training_mode=1)
        nodes = [conv, *gather, helper.make_node("Add", ["z", "rows4"], ["s"], name="add"), node]
    else:
        node, bn_inits = bn("bn", "z", "b", bn_params(rng, C))
        nodes = [conv, node, *gather, helper.make_node("Add", ["b", "rows4"], ["y"], name="add")]
    inits = [init("table", table), init("w", w), init("pick", np.array([0, 7, 2049, ROWS - 1], np.int64)),
             init("shape", np.array([1, C, 8, 8], np.int64)), *bn_inits]
    opset = 15 if training else 17
    model = make_model(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", [1, C, 8, 8])], inits, opset=opset, check=False)
    return model, table


def _write(model: onnx.ModelProto, folder: Path, location: str = "weights.bin") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "m.onnx"
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # onnx.save with external data rewrites the model it is given
    onnx.save(copy, path, save_as_external_data=True, all_tensors_to_one_file=True, location=location,
              size_threshold=1024)
    return path


def _table(model: onnx.ModelProto) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == "table")


def _canonical(path: Path) -> tuple[bytes, bytes]:
    """The model file with its data file's random name blanked, and the data file's bytes."""
    [data] = [p for p in path.parent.iterdir() if p.name.startswith(path.name + ".") and p.name.endswith(".data")]
    return path.read_bytes().replace(data.name.encode(), b"#" * len(data.name)), data.read_bytes()


def test_large_tensor_is_left_in_its_file_and_read_on_demand(rng, tmp_path, small_threshold):
    model, table = _model(rng)
    loaded = load_onnx(_write(model, tmp_path))
    t = _table(loaded.model)
    assert t.data_location == onnx.TensorProto.EXTERNAL and not t.HasField("raw_data")
    assert deferred.is_deferred(t)
    w = next(x for x in loaded.model.graph.initializer if x.name == "w")  # below the threshold: read
    assert not deferred.is_deferred(w) and w.HasField("raw_data")
    np.testing.assert_array_equal(tensor_to_array(t), table)


def test_load_and_save_do_not_hold_the_deferred_tensor(rng, tmp_path, small_threshold):
    """Python-side allocations while loading and writing a model with a 32 MiB deferred table stay
    far below the table's size (reading it whole, as onnx's loader does, allocates all of it). The
    table is large enough that incidental allocations (a resize of the interpreter's table of
    interned strings, ~4 MB once many tests ran) stay below the bound."""
    big = rand(rng, 32 * ROWS, COLS)  # 32 MiB
    model = make_model([helper.make_node("Gather", ["table", "pick"], ["y"], axis=0)], [vi("pick", [2], INT64)],
                       [vi("y", [2, COLS])], [init("table", big)], check=False)
    src = _write(model, tmp_path / "in")
    gc.collect()  # start from no garbage: what an earlier test left must not count in this peak
    tracemalloc.start()
    try:
        loaded = load_onnx(src)
        save_onnx(loaded.model, tmp_path / "out" / "m.onnx", external_data=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < big.nbytes // 4, peak
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(_table(onnx.load(tmp_path / "out" / "m.onnx"))), big)


def test_written_model_is_byte_identical_to_one_written_from_memory(rng, tmp_path, monkeypatch):
    model, _ = _model(rng)
    src = _write(model, tmp_path / "in")
    monkeypatch.setattr(deferred, "COPY_CHUNK", 4096 + 12)  # chunks that do not divide the tensor
    monkeypatch.setattr(deferred, "DEFER_MIN_BYTES", 2**62)
    eager = load_onnx(src)
    assert not deferred.has_deferred(eager.model.graph.initializer)
    save_onnx(eager.model, tmp_path / "eager" / "m.onnx", external_data=True)
    monkeypatch.setattr(deferred, "DEFER_MIN_BYTES", SMALL)
    lazy = load_onnx(src)
    assert deferred.has_deferred(lazy.model.graph.initializer)
    save_onnx(lazy.model, tmp_path / "lazy" / "m.onnx", external_data=True)
    assert _canonical(tmp_path / "lazy" / "m.onnx") == _canonical(tmp_path / "eager" / "m.onnx")


@pytest.mark.parametrize("training", [False, True], ids=["inference", "calibrated"])
def test_fold_output_is_byte_identical_with_a_deferred_table(rng, tmp_path, monkeypatch, training):
    """The whole fold (calibration too, where the table reaches onnxruntime read on demand)."""
    model, _ = _model(rng, training=training)
    src = _write(model, tmp_path / "in")
    data = {"x": rand(rng, 16, 3, 8, 8)} if training else None
    monkeypatch.setattr(deferred, "DEFER_MIN_BYTES", 2**62)
    eager = bnfold.fold(src, output=tmp_path / "eager" / "m.onnx", data=data, batch_size=1 if training else None)
    monkeypatch.setattr(deferred, "DEFER_MIN_BYTES", SMALL)
    reads: list[str] = []
    read = deferred.tensor_bytes
    monkeypatch.setattr(deferred, "tensor_bytes", lambda t: reads.append(t.name) or read(t))
    lazy = bnfold.fold(src, output=tmp_path / "lazy" / "m.onnx", data=data, batch_size=1 if training else None)
    assert eager.ok and lazy.ok
    assert reads == (["table"] if training else [])  # read once for calibration; copied, never read, otherwise
    assert lazy._model is not None and deferred.is_deferred(_table(lazy._model))  # while bnfold ran
    assert _canonical(tmp_path / "lazy" / "m.onnx") == _canonical(tmp_path / "eager" / "m.onnx")


@pytest.mark.parametrize("change", ["rewrite", "touch", "replace"])
def test_data_file_changed_between_load_and_save_is_refused(rng, tmp_path, small_threshold, change):
    model, _ = _model(rng)
    src = _write(model, tmp_path / "in")
    loaded = load_onnx(src)
    data = src.parent / "weights.bin"
    if change == "rewrite":  # same size, other bytes
        with open(data, "r+b") as fh:
            fh.write(b"\xff" * 16)
        st = data.stat()
        os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    elif change == "touch":
        st = data.stat()
        os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    else:  # another file under the same name
        tmp = src.parent / "new.bin"
        tmp.write_bytes(data.read_bytes())
        os.replace(tmp, data)
    out = tmp_path / "out" / "m.onnx"
    with pytest.raises(BadInputError, match="changed since the model was read; leave the model's data files"):
        save_onnx(loaded.model, out, external_data=True)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []  # nothing left behind
    with pytest.raises(BadInputError, match="changed since the model was read"):
        tensor_to_array(_table(loaded.model))


def _escaping(tmp_path: Path, how: str) -> Path:
    """A model whose large tensor's location escapes its folder (``how``); returns its path."""
    rng = np.random.default_rng(0)
    model, _ = _model(rng)
    outside = tmp_path / "outside"
    src = _write(model, outside)  # weights.bin in ``outside``
    inner = tmp_path / "models"
    inner.mkdir()
    stored = onnx.load(src, load_external_data=False)
    target = {"dotdot": "../outside/weights.bin", "absolute": str(outside / "weights.bin"),
              "symlink": "link.bin"}[how]
    if how == "symlink":
        os.symlink(outside / "weights.bin", inner / "link.bin")
    for t in stored.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = target
    path = inner / "m.onnx"
    path.write_bytes(stored.SerializeToString())
    return path


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_containment_is_refused_for_a_deferred_tensor_as_before(tmp_path, monkeypatch, how):
    """The refusal is onnx's check, now named as bad input (``BadInputError`` carrying onnx's
    message; it used to escape as onnx's ValidationError), the same whether the tensor would be
    read or deferred."""
    path = _escaping(tmp_path, how)
    refusals = []
    for threshold in (2**62, SMALL):  # everything read at load (as onnx does), then the table deferred
        monkeypatch.setattr(deferred, "DEFER_MIN_BYTES", threshold)
        with pytest.raises(BadInputError, match="outside the directory|should be a relative path|symbolic link") \
                as info:
            load_onnx(path)
        refusals.append((type(info.value), str(info.value)))
    assert refusals[0] == refusals[1]


def test_a_deferred_file_swapped_for_an_escaping_link_after_load_is_refused(rng, tmp_path, small_threshold):
    model, _ = _model(rng)
    src = _write(model, tmp_path / "in")
    loaded = load_onnx(src)
    data = src.parent / "weights.bin"
    moved = tmp_path / "elsewhere.bin"
    os.replace(data, moved)
    os.symlink(moved, data)
    with pytest.raises(BadInputError, match="could not be read|changed since the model was read"):
        save_onnx(loaded.model, tmp_path / "out" / "m.onnx", external_data=True)


def test_out_of_range_deferred_tensor_is_refused_at_load_as_onnx_does(rng, tmp_path, monkeypatch):
    model, _ = _model(rng)
    src = _write(model, tmp_path)
    stored = onnx.load(src, load_external_data=False)
    for e in _table(stored).external_data:
        if e.key == "offset":
            e.value = str(10**9)
    src.write_bytes(stored.SerializeToString())
    messages = []
    for threshold in (2**62, SMALL):
        monkeypatch.setattr(deferred, "DEFER_MIN_BYTES", threshold)
        with pytest.raises(BadInputError, match="exceeds file size") as info:
            load_onnx(src)
        messages.append(str(info.value))
    assert messages[0] == messages[1]


def test_data_shared_with_a_subgraph_tensor_still_loads(rng, tmp_path, small_threshold):
    """Only main-graph initializers are deferred; the rest is read as onnx's loader reads it."""
    model, table = _model(rng)
    loaded = load_onnx(_write(model, tmp_path))
    others = [t for t in loaded.model.graph.initializer if t.name != "table"]
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in others)
    assert all(not deferred.is_deferred(t) for t in others)
    assert FLOAT == _table(loaded.model).data_type
    np.testing.assert_array_equal(tensor_to_array(_table(loaded.model)), table)



def test_fold_result_model_holds_every_tensor_inline(tmp_path: Path, small_threshold: None) -> None:
    """A deferred table stays in its file while bnfold runs, but the model ``fold`` hands back holds
    its data (as onnx.load would): it serialises and runs on its own, away from the data file."""
    import onnxruntime as ort

    model, table = _model(np.random.default_rng(3))
    src = _write(model, tmp_path / "in")
    res = bnfold.fold(src, verify=False)
    assert res._model is not None and any(deferred.is_deferred(t) for t in res._model.graph.initializer)
    out = res.model
    assert out is not None and not any(deferred.is_deferred(t) for t in out.graph.initializer)
    t = _table(out)
    assert t.data_location == onnx.TensorProto.DEFAULT and not t.external_data and t.raw_data == table.tobytes()
    (tmp_path / "in" / "weights.bin").unlink()  # the returned model no longer needs the source file
    x = rand(np.random.default_rng(4), 1, 3, 8, 8)
    sess = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": x})
    assert y.shape == (1, C, 8, 8) and np.isfinite(y).all()
