"""Distributed calibration, PyTorch route (issue 17 point 1): ``bnfold.torch.calibrate`` inside a
process group with each rank's own part of the batches, and ``--model-factory`` under torchrun,
against one process."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from distributed_launch import free_port, run_ranks
from distributed_workers import _torch_batches, _torch_model

import bnfold.torch

pytestmark = pytest.mark.slow(reason="two or three processes importing torch per test (~5-10 s)")

# the per-batch moments are computed alike in every layout; only the order of the float64 additions
# differs (see test_distributed_onnx.py): float64 round-off, 1e-12 relative with a wide margin
ROUND_OFF = 1e-12


def _single(batch_size: int) -> dict[str, np.ndarray]:
    _, stats = bnfold.torch.calibrate(_torch_model(), _torch_batches(batch_size), distributed=False)
    out: dict[str, np.ndarray] = {}
    for name, st in stats.items():
        for field in ("mean", "var_unbiased", "var_pooled"):
            out[f"{name}|{field}"] = np.asarray(getattr(st, field))
        out[f"{name}|counts"] = np.array([st.samples, st.batches])
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_with_their_own_parts_equal_one_process(tmp_path: Path, world: int) -> None:
    # 37 samples in batches of 8: 5 batches, the last one of 5; 3 ranks get 2, 2 and 1 of them
    ended = run_ranks(world, ["torch", str(tmp_path), "8"])
    for e in ended:
        assert e.returncode == 0, e.stderr[-2000:]
    ranks = [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(world)]
    for r in ranks[1:]:
        for k in ranks[0]:
            assert np.array_equal(ranks[0][k], r[k]), k  # bitwise the same on every rank
    single = _single(8)
    for k, v in single.items():
        if k.endswith("|counts"):
            assert np.array_equal(ranks[0][k], v), k  # samples and batches over all ranks
        else:
            assert float(np.max(np.abs(ranks[0][k] - v) / np.maximum(np.abs(v), 1e-30))) <= ROUND_OFF, k
    assert int(ranks[0]["calibration|batches"][0]) == 5


_FACTORY = '''
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3),
                         nn.BatchNorm2d(4)).train()
'''


def test_model_factory_under_torchrun_matches_one_process(tmp_path: Path) -> None:
    (tmp_path / "dmodels.py").write_text(_FACTORY)
    rng = np.random.default_rng(0)
    np.save(tmp_path / "calib.npy", (rng.standard_normal((29, 3, 8, 8)) * 2 + 1).astype(np.float32))
    bnfold_exe = shutil.which("bnfold", path=str(Path(sys.executable).parent))
    assert bnfold_exe is not None
    common = ["fold", "--model-factory", "dmodels:build", "--data", "calib.npy", "--batch-size", "6"]
    env = {"PYTHONPATH": str(tmp_path), "PATH": str(Path(sys.executable).parent)}
    one = subprocess.run([bnfold_exe, *common, "-o", "one.ts", "--report", "one.json"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=180)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend",
                          "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--no-python", bnfold_exe, *common,
                          "-o", "two.ts", "--report", "two.json"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=240)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("Wrote report") == 1, two.stdout
    r1, r2 = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert r1["calibration"] == {"world_size": 1, "samples": 29, "batches": 5}
    assert r2["calibration"] == {"world_size": 2, "samples": 29, "batches": 5}
    for b1, b2 in zip(r1["bns"], r2["bns"], strict=True):
        s1, s2 = b1["stats"], b2["stats"]
        assert s1["batches"] == s2["batches"] == 5 and s1["samples"] == s2["samples"]
        for key in ("mean_min", "mean_max", "var_unbiased_min", "var_unbiased_max", "var_pooled_max"):
            assert abs(s1[key] - s2[key]) <= ROUND_OFF * max(abs(s1[key]), 1e-30), key
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".ts", ".json")) == [
        "one.json", "one.ts", "two.json", "two.ts"]
