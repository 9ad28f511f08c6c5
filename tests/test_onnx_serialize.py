"""The streamed writer produces a file protobuf parses back into exactly the model."""
from __future__ import annotations

import hashlib
import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.onnx import serialize
from bnfold.onnx.io import prepare_for_save, save_onnx


def _model(big_every: int = 2, n: int = 6, big: int = 300_000) -> onnx.ModelProto:
    """x -> Add(c0) -> Add(c1) ...; every ``big_every``-th constant is large (a Gather table)."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    cur = "x"
    for k in range(n):
        if k % big_every == 0:
            table = rng.standard_normal((big // 4, 4)).astype(np.float32)
            t = numpy_helper.from_array(table, f"table{k}")
            t.doc_string = f"table {k}"
            inits.append(t)
            inits.append(numpy_helper.from_array(np.array([k], np.int64), f"idx{k}"))
            nodes.append(helper.make_node("Gather", [f"table{k}", f"idx{k}"], [f"row{k}"]))
            nodes.append(helper.make_node("Add", [cur, f"row{k}"], [f"y{k}"]))
        else:
            inits.append(numpy_helper.from_array(rng.standard_normal((1, 4)).astype(np.float32), f"c{k}"))
            nodes.append(helper.make_node("Add", [cur, f"c{k}"], [f"y{k}"]))
        cur = f"y{k}"
    then_g = helper.make_graph([helper.make_node("Identity", ["sub_c"], ["then_out"])], "then", [],
                               [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, [1, 4])],
                               [numpy_helper.from_array(np.ones((1, 4), np.float32), "sub_c")])
    else_g = helper.make_graph([helper.make_node("Identity", [cur], ["else_out"])], "else", [],
                               [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, [1, 4])])
    inits.append(numpy_helper.from_array(np.array(False), "cond"))
    nodes.append(helper.make_node("If", ["cond"], ["out"], then_branch=then_g, else_branch=else_g))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4])], inits,
                          doc_string="graph doc")
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="test")
    helper.set_model_props(m, {"k": "v"})
    prepare_for_save(m)
    return m


@pytest.mark.parametrize("size_hint", [None, 10, 1 << 40])  # one piece below the limit, else streamed
@pytest.mark.parametrize("stream_min", [1, 1024, 1 << 20, 1 << 40])
def test_round_trip_is_the_same_model(stream_min, size_hint, monkeypatch):
    monkeypatch.setattr(serialize, "STREAM_MIN_BYTES", stream_min)
    m = _model()
    buf = io.BytesIO()
    digest = serialize.write_model(m, buf, size_hint)
    data = buf.getvalue()
    back = onnx.ModelProto()
    back.ParseFromString(data)
    assert back == m  # every field, every tensor byte
    assert len(data) == m.ByteSize()
    assert digest == hashlib.sha256(data).hexdigest()


def test_streamed_file_runs_in_onnxruntime(tmp_path, monkeypatch):
    monkeypatch.setattr(serialize, "STREAM_MIN_BYTES", 1024)
    m = _model(big_every=3, n=7)
    path = tmp_path / "m.onnx"
    digest = save_onnx(m, path)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    onnx.checker.check_model(str(path))
    x = np.zeros((1, 4), np.float32)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    assert np.array_equal(sess.run(None, {"x": x})[0], ref.run(None, {"x": x})[0])


def test_model_is_not_modified(monkeypatch):
    monkeypatch.setattr(serialize, "STREAM_MIN_BYTES", 1)
    m = _model()
    before = m.SerializeToString()
    serialize.write_model(m, io.BytesIO())
    assert m.SerializeToString() == before


def test_raw_length_inverts_the_field_encoding():
    for n in (0, 1, 127, 128, 16383, 16384, 2**21, 2**28 + 5):
        enc = len(serialize._key(serialize._TENSOR_RAW)) + len(serialize._varint(n)) + n
        assert serialize._raw_length(enc) == n


class _FailingFile(io.BytesIO):
    def write(self, b):
        if len(self.getbuffer()) > 1000:
            raise OSError(28, "No space left on device")
        return super().write(b)


def test_a_failing_write_raises_and_leaves_no_thread(monkeypatch):
    import threading

    monkeypatch.setattr(serialize, "STREAM_MIN_BYTES", 1024)
    before = threading.active_count()
    with pytest.raises(OSError, match="No space"):
        serialize.write_model(_model(), _FailingFile())
    assert threading.active_count() == before


def test_small_size_hint_serialises_in_one_piece(monkeypatch):
    # with a hint below the limit, no tensor is looked at: one protobuf serialisation, one write
    monkeypatch.setattr(serialize, "STREAM_MIN_BYTES", 1)
    m = _model()
    writes = []

    class _Recording(io.BytesIO):
        def write(self, b):
            writes.append(len(b))
            return super().write(b)

    buf = _Recording()
    serialize.write_model(m, buf, size_hint=serialize.ONE_PIECE_MAX_BYTES - 1)
    assert writes == [m.ByteSize()] and buf.getvalue() == m.SerializeToString()
    writes.clear()
    serialize.write_model(m, _Recording(), size_hint=serialize.ONE_PIECE_MAX_BYTES)
    assert len(writes) > 1  # streamed
