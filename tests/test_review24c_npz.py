"""review24c: an .npz holding one array name twice (two members 'x.npy', or 'x' and 'x.npy') was
accepted (exit 0) with one of the two arrays silently picked, not necessarily the one numpy.load
returns for that key: a hostile data file could show one array to a person checking it and
calibrate on another. It is bad input now: exit 3, one line, nothing written."""
from __future__ import annotations

import io
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from cli_run import run_cli

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


@pytest.mark.parametrize("names", [("images.npy", "images.npy"), ("images", "images.npy")])
def test_an_npz_with_one_array_name_twice_is_exit_3(tmp_path: Path, names: tuple[str, str]) -> None:
    x = np.load(SAMPLES / "resnet_calib.npz")["images"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile: "Duplicate name"
        with zipfile.ZipFile(tmp_path / "calib.npz", "w") as z:
            z.writestr(names[0], _npy(x))
            z.writestr(names[1], _npy(np.full_like(x, 1e3)))
    before = set(os.listdir(tmp_path))
    proc = run_cli("fold", SAMPLES / "resnet_train.onnx", "--data", "calib.npz", "-o", "out.onnx", "--no-verify",
                   cwd=tmp_path)
    assert proc.returncode == 3, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnfold: error: ") and "twice" in lines[0], lines
    assert set(os.listdir(tmp_path)) == before
