"""review24c: under torchrun, a rank that calibrates nothing (no BN selected: eval-mode BNs with
--recalibrate training) joined the others' calibration gather only after its run, so rank 0
wrote OUTPUT ('Wrote g.pt2') and only then learnt that rank 1 had calibrated (another
--recalibrate) or failed: exit 3 on every rank, with the model left on disk. Now such a rank joins
that gather before anything moves into place: exit 3 and nothing written."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from distributed_launch import run_ranks

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.slow

FACTORY = """
import torch.nn as nn
def build():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
"""
# each rank runs its own argument list (RANK picks it), in the test's folder
PICK = ("import json, os, sys; a = json.loads(sys.argv[1])[int(os.environ['RANK'])]; "
        "from bnfold.cli.main import main; sys.exit(main(a))")


def _ranks(tmp_path: Path, per_rank: list[list[str]]) -> list:
    assert Path.cwd() == tmp_path  # the ranks inherit the folder (the factory module and the data)
    return run_ranks(len(per_rank), [], command=[sys.executable, "-c", PICK, json.dumps(per_rank)],
                     extra_env={"BNFOLD_DIST_TIMEOUT": "60", "PYTHONPATH": str(tmp_path)}, timeout=170)


@pytest.mark.parametrize("rank1", [["--recalibrate", "all"], ["--data", "empty.npy"]])
def test_a_rank_that_calibrates_nothing_writes_nothing_when_another_rank_differs(
        tmp_path: Path, rank1: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fac24c.py").write_text(FACTORY, encoding="utf-8")
    rng = np.random.default_rng(0)
    np.save(tmp_path / "calib.npy", rng.standard_normal((8, 3, 8, 8)).astype(np.float32))
    np.save(tmp_path / "empty.npy", np.zeros((0, 3, 8, 8), np.float32))
    base = ["fold", "--model-factory", "fac24c:build", "--data", "calib.npy", "--batch-size", "2", "-o", "out.pt2",
            "--no-verify", "--report", "r.json"]
    before = set(os.listdir(tmp_path))
    ended = _ranks(tmp_path, [base, base + rank1])
    for e in ended:
        assert e.returncode == 3, (e.rank, e.returncode, e.stdout, e.stderr)
        lines = e.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("bnfold: error: "), e.stderr
    assert set(os.listdir(tmp_path)) - {"__pycache__"} == before  # no out.pt2, no r.json, no staging


def test_ranks_that_all_calibrate_nothing_still_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fac24c.py").write_text(FACTORY, encoding="utf-8")
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32))
    base = ["fold", "--model-factory", "fac24c:build", "--data", "calib.npy", "--batch-size", "2", "-o", "out.pt2",
            "--no-verify"]
    ended = _ranks(tmp_path, [base, base])
    assert [e.returncode for e in ended] == [0, 0], [(e.stdout, e.stderr) for e in ended]
    assert (tmp_path / "out.pt2").is_file()
