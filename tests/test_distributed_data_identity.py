"""Ranks of a distributed run that read different calibration data refuse to merge (issue 17 point
1): every rank reads the same --data and keeps batches j mod N, so a rank whose copy of the data
differs (another file of the same shape) would merge statistics of other samples. The ranks compare
a fingerprint of the data (CalibrationData.fingerprint: sample counts, dtypes, shapes, and an .npz
member's CRC-32 or a .npy's first and last samples) with the model and batches before merging."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from distributed_launch import run_ranks
from distributed_workers import DATA, MODEL

from bnfold.data.sources import from_arrays, open_data
from bnfold.records import InputSpec

SPEC = [InputSpec("x", np.dtype(np.float32), (None, 3))]


def _fp(path: Path) -> str:
    return open_data(path, SPEC, 4).fingerprint()


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed, np.save])
def test_fingerprint_sees_content_not_paths(tmp_path: Path, save: object) -> None:
    x = np.arange(30, dtype=np.float32).reshape(10, 3)
    ext = ".npy" if save is np.save else ".npz"

    def write(name: str, a: np.ndarray) -> Path:
        p = tmp_path / (name + ext)
        if save is np.save:
            np.save(p, a)
        else:
            save(p, x=a)  # type: ignore[operator]
        return p

    same = _fp(write("a", x)) == _fp(write("copy_in_another_place", x.copy()))
    y = x.copy()
    y[9, 2] += 1  # the last sample differs: CRC for .npz, last-sample bytes for .npy
    assert same and _fp(write("b", y)) != _fp(write("a2", x))
    z = x.copy()
    z[0, 0] = -1
    assert _fp(write("c", z)) != _fp(write("a3", x))
    arrays = from_arrays({"x": x}, SPEC, 4)
    assert arrays.fingerprint() == from_arrays({"x": x.copy()}, SPEC, 4).fingerprint()
    assert arrays.fingerprint() != from_arrays({"x": z}, SPEC, 4).fingerprint()


@pytest.mark.slow(reason="two bnfold processes importing torch (~6 s)")
def test_ranks_with_different_data_refuse_to_merge(tmp_path: Path) -> None:
    # same model, same shapes and sample count, other samples on rank 1: before, merged and written (exit 0)
    with np.load(DATA) as z:
        arrays = {k: z[k] for k in z.files}
    other = tmp_path / "in" / "other.npz"
    other.parent.mkdir()
    np.savez(other, **{k: (v * np.float32(2) + np.float32(1)).astype(v.dtype) for k, v in arrays.items()})
    outdir = tmp_path / "out"
    outdir.mkdir()
    exe = shutil.which("bnfold", path=str(Path(sys.executable).parent))
    assert exe is not None

    def cmd(data: Path) -> list[str]:
        return [exe, "fold", str(MODEL), "--data", str(data), "--batch-size", "14", "-o", str(outdir / "out.onnx")]

    script = ('import os, sys; a = sys.argv[1:]; i = a.index("--"); '
              'cmd = a[i + 1:] if os.environ["RANK"] == "1" else a[:i]; os.execv(cmd[0], cmd)')
    ended = run_ranks(2, [], command=[sys.executable, "-c", script, *cmd(DATA), "--", *cmd(other)],
                      extra_env={"BNFOLD_DIST_TIMEOUT": "60"})
    assert [e.returncode for e in ended] == [3, 3], [e.stderr[-800:] for e in ended]
    assert all("calibrates something else than rank 0" in e.stderr and "data sha256" in e.stderr for e in ended)
    assert list(outdir.iterdir()) == []
