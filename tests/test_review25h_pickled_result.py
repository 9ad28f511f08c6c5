"""Review 25h: a ``FoldResult`` sent to another process (``ProcessPoolExecutor``, ``Pool.map``)
must hold all its data there: tensors bnfold left in their data file (deferred) are known only to
the process that loaded them, so the pickled model has to carry them."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import bnfold
from bnfold.onnx import deferred

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


def test_pickled_fold_result_keeps_deferred_tensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = onnx.load(str(SAMPLES / "resnet_train.onnx"))
    src = tmp_path / "in" / "m.onnx"
    src.parent.mkdir()
    onnx.save(model, str(src), save_as_external_data=True, all_tensors_to_one_file=True, location="m.data",
              size_threshold=0)
    monkeypatch.setattr(deferred, "DEFER_MIN_BYTES", 1024)
    result = bnfold.fold(str(src), data=str(SAMPLES / "resnet_calib.npz"), verify=False)
    expected = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}  # type: ignore[union-attr]
    result = bnfold.fold(str(src), data=str(SAMPLES / "resnet_calib.npz"), verify=False)
    blob = pickle.dumps(result)
    monkeypatch.setattr(deferred, "_STAMPS", {})  # another process: it never loaded the model
    there = pickle.loads(blob)
    assert there.model is not None
    for t in there.model.graph.initializer:
        assert t.data_location != onnx.TensorProto.EXTERNAL, t.name
        np.testing.assert_array_equal(numpy_helper.to_array(t), expected[t.name])
