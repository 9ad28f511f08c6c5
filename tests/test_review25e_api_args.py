"""Review 25e: the Python API given wrong argument types raises one BadInputError naming the
argument before any work, not a TypeError / AttributeError from deep inside the pipeline."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import bnfold

ROOT = Path(__file__).resolve().parent.parent
MODEL = str(ROOT / "sample_models" / "resnet_train.onnx")
DATA = str(ROOT / "sample_models" / "resnet_calib.npz")


def _bad(fn, match: str) -> None:
    with pytest.raises(bnfold.BadInputError, match=match):
        fn()


@pytest.mark.parametrize("model", [{"a": 1}, 3, None, MODEL.encode()])
def test_fold_and_inspect_refuse_a_model_of_the_wrong_type(model, tmp_path: Path) -> None:
    _bad(lambda: bnfold.fold(model, output=str(tmp_path / "o.onnx")), "model must be a path")
    _bad(lambda: bnfold.inspect(model), "model must be a path")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("ref", [5, onnx.ModelProto(), MODEL.encode()])
def test_verify_refuses_models_of_the_wrong_type(ref) -> None:
    _bad(lambda: bnfold.verify(ref, MODEL), "reference must be a path")
    _bad(lambda: bnfold.verify(MODEL, ref), "candidate must be a path")


@pytest.mark.parametrize("bs", [0, -1, 1.5, True, "4"])
def test_verify_checks_batch_size(bs) -> None:
    _bad(lambda: bnfold.verify(MODEL, MODEL, batch_size=bs), "batch size must be")


@pytest.mark.parametrize("it", [0, -1, 1.5, True])
def test_verify_checks_iterations(it) -> None:
    _bad(lambda: bnfold.verify(MODEL, MODEL, iterations=it), "iterations must be")


@pytest.mark.parametrize(("kw", "match"), [
    ({"seed": "x"}, "seed must be"), ({"val_range": 5}, "val_range must be"),
    ({"val_range": (2.0, 1.0)}, "val_range LO"), ({"config": {}}, "config must be a bnfold.VerifyConfig"),
    ({"config": bnfold.VerifyConfig(atol=1e-3)}, r"VerifyConfig.atol must be"),  # type: ignore[arg-type]
    ({"config": bnfold.VerifyConfig(providers="cpu")}, r"VerifyConfig.providers must be"),  # type: ignore[arg-type]
    ({"input_shapes": 5}, "input_shapes must be"), ({"input_shapes": [1, 2]}, "not a 'NAME:DIMS' string"),
])
def test_verify_checks_its_other_arguments(kw, match) -> None:
    _bad(lambda: bnfold.verify(MODEL, MODEL, **kw), match)


@pytest.mark.parametrize(("kw", "match"), [
    ({"verify_samples": True}, "verify_samples must be a whole number"),
    ({"verify_samples": "4"}, "verify_samples must be a whole number"),
    ({"verify_samples": None}, "verify_samples must be a whole number"),
    ({"verify_samples": 0}, "verify_samples must be at least 1"),
    ({"verify_config": {"providers": ("cpu",)}}, "verify_config must be a bnfold.VerifyConfig"),
    ({"output": 5}, "output must be a path"), ({"frozen_output": 5}, "frozen_output must be a path"),
    ({"progress": 5}, "progress must be a callable"), ({"data": 5}, "data must be"),
    ({"input_shapes": 5}, "input_shapes must be"),
])
def test_fold_checks_its_arguments(kw, match, tmp_path: Path) -> None:
    args = {"output": str(tmp_path / "o.onnx"), "data": DATA, "batch_size": 16, **kw}
    _bad(lambda: bnfold.fold(MODEL, **args), match)
    assert list(tmp_path.iterdir()) == []


def test_inspect_checks_progress_and_data() -> None:
    _bad(lambda: bnfold.inspect(MODEL, data=DATA, progress=5), "progress must be a callable")
    _bad(lambda: bnfold.inspect(MODEL, data=5), "data must be")


def test_torch_api_checks_progress_and_convert_arguments(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    import bnfold.torch as bt

    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    x = [torch.randn(4, 3, 8, 8)]
    _bad(lambda: bt.calibrate(m, x, progress=5), "progress must be a callable")
    _bad(lambda: bt.fold(m, x, progress=5), "progress must be a callable")
    out = str(tmp_path / "o.onnx")
    _bad(lambda: bt.convert(m, None, 5), "output must be a path")
    _bad(lambda: bt.convert(m, None, out, verify_samples=0), "verify_samples must be at least 1")
    _bad(lambda: bt.convert(m, None, out, config={}), "config must be a bnfold.VerifyConfig")
    _bad(lambda: bt.convert(m, "x.npz", out, batch_size=1.5), "batch size must be a whole number")
    assert list(tmp_path.iterdir()) == []


def test_numpy_integers_still_accepted(tmp_path: Path) -> None:
    r = bnfold.fold(MODEL, data=DATA, batch_size=np.int64(16), verify_samples=np.int32(2), dry_run=True)
    assert r.model is None
