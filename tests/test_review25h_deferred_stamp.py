"""Review 25h: a deferred tensor must be checked against the data file its own load saw. The
stamp was kept per (folder, location) for the whole process, so a second load of a replaced model
(another thread, a later ``fold`` in the same pipeline) overwrote it, and the first model then read
the new file's bytes without a word: a model mixing two files' weights."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from bnfold.errors import BadInputError
from bnfold.onnx import deferred


def _save(folder: Path, value: float) -> onnx.TensorProto:
    t = numpy_helper.from_array(np.full(4096, value, dtype=np.float32), "w")
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["w"], ["y"])], "g", [],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4096])], [t])
    tmp = folder / "new"
    tmp.mkdir(exist_ok=True)
    onnx.save(onnx.helper.make_model(graph), str(tmp / "m.onnx"), save_as_external_data=True, location="m.data",
              size_threshold=0)
    os.replace(tmp / "m.data", folder / "m.data")  # a new file (new inode) under the same name
    return onnx.load(str(tmp / "m.onnx"), load_external_data=False).graph.initializer[0]


def test_second_load_does_not_bless_replaced_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deferred, "DEFER_MIN_BYTES", 1024)
    monkeypatch.setattr(deferred, "_STAMPS", {})
    first = _save(tmp_path, 1.0)
    assert deferred.defer(first, str(tmp_path))
    second = _save(tmp_path, 2.0)  # the model replaced, then loaded again in the same process
    assert deferred.defer(second, str(tmp_path))
    assert np.frombuffer(deferred.tensor_bytes(second), np.float32)[0] == 2.0
    with pytest.raises(BadInputError, match="changed since the model was read"):
        deferred.tensor_bytes(first)
