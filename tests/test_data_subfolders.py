"""A calibration data folder's subfolders are not read, and the report says so (ONNX route, the
CLI, and bnfold.torch.calibrate on opened data): a folder of shards split into sub-folders must
not calibrate on the top level's files alone without a word."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from cli_run import run_cli
from test_cli import conv_bn_model

import bnfold
import bnfold.torch
from bnfold.data.sources import open_data
from bnfold.errors import BnfoldWarning
from bnfold.records import InputSpec


def _data_folder(root: Path, *, subfolder: bool, key: str = "images") -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    top = rng.normal(1.0, 2.0, (8, 3, 8, 8)).astype(np.float32)
    deeper = rng.normal(-4.0, 0.5, (8, 3, 8, 8)).astype(np.float32)
    folder = root / "data"
    folder.mkdir()
    np.savez(folder / "a.npz", **{key: top})
    if subfolder:
        (folder / "more").mkdir()
        np.savez(folder / "more" / "b.npz", **{key: deeper})
    return folder, top, deeper


@pytest.mark.parametrize("subfolder", [False, True])
def test_cli_report_names_the_unread_subfolder(tmp_path: Path, subfolder: bool) -> None:
    model = conv_bn_model(tmp_path / "train.onnx", training=True)
    folder, top, _ = _data_folder(tmp_path, subfolder=subfolder)
    alone = tmp_path / "alone.npz"
    np.savez(alone, images=top)
    reports, shown = {}, {}
    for name, data in (("folder", folder), ("alone", alone)):
        report = tmp_path / f"{name}.json"
        proc = run_cli("fold", model, "--data", data, "--batch-size", "4", "-o", tmp_path / f"{name}.onnx",
                       "--report", report)
        assert proc.returncode == 0, proc.stderr
        reports[name] = json.loads(report.read_text(encoding="utf-8"))
        shown[name] = proc.stdout + proc.stderr
    said = [w for w in reports["folder"]["warnings"] if "subfolder" in w]
    if subfolder:
        assert said == [f"calibration data folder '{folder}': subfolder(s) 'more' not read (only the .npz/.npy "
                        "files directly in the folder are); move their files up or point the data at them"]
        assert said[0] in shown["folder"]  # the summary on the terminal lists it too
    else:
        assert said == []
    # the warning tells the truth: the statistics are those of the top level's file alone
    assert reports["folder"]["bns"][0]["action"] == "folded"
    assert json.dumps(reports["folder"]["bns"]) == json.dumps(reports["alone"]["bns"])


def test_api_fold_warns_and_lists_many_subfolders_briefly(tmp_path: Path) -> None:
    model = conv_bn_model(tmp_path / "train.onnx", training=True)
    folder, _, _ = _data_folder(tmp_path, subfolder=True)
    for name in ("x1", "x2", "x3"):
        (folder / name).mkdir()
    (folder / ".hidden").mkdir()
    result = bnfold.fold(model, data=folder, batch_size=4)
    (said,) = [w for w in result.report.warnings if "subfolder" in w]
    assert "'more', 'x1', 'x2' and 1 more not read" in said
    assert ".hidden" not in said


def test_torch_calibrate_on_opened_folder_warns(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    folder, top, _ = _data_folder(tmp_path, subfolder=True, key="input")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    data = open_data(folder, [InputSpec("input", np.dtype(np.float32), (None, 3, 8, 8))], 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, stats = bnfold.torch.calibrate(model, data)
    said = [str(w.message) for w in caught if issubclass(w.category, BnfoldWarning) and "subfolder" in str(w.message)]
    assert len(said) == 1 and "'more'" in said[0]
    # and only the top level's samples were used: the conv's output over them, Algorithm 2 by hand
    with torch.no_grad():
        y = model[0](torch.from_numpy(top)).double()
    means = [b.mean(dim=(0, 2, 3)) for b in y.split(4)]
    np.testing.assert_allclose(stats["1"].mean, torch.stack(means).mean(0).numpy(), rtol=1e-6, atol=1e-7)
