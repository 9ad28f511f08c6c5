"""Distributed calibration, ONNX route (issue 17 point 1): 2 and 3 real processes on gloo/loopback
against one process; uneven batch counts, a rank with no batch, the CLI under torchrun."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from distributed_launch import free_port, run_ranks
from distributed_workers import DATA, MODEL
from onnx import numpy_helper

import bnfold

# the per-batch moments come from the same onnxruntime runs on every layout; only the order of the
# float64 additions differs, so one process and N ranks agree to float64 round-off: a few ulps of
# sums over <= 7 batches (1e-12 relative leaves a thousandfold margin)
ROUND_OFF = 1e-12


def _single(batch_size: int) -> dict[str, np.ndarray]:
    result = bnfold.fold(str(MODEL), data=str(DATA), batch_size=batch_size, dry_run=True, distributed=False)
    out = {}
    for b in result.report.bns:
        assert b.stats is not None
        for field in ("mean", "var_unbiased", "var_pooled"):
            out[f"{b.name}|{field}"] = np.asarray(getattr(b.stats, field))
        out[f"{b.name}|counts"] = np.array([b.stats.samples, b.stats.batches])
    return out


def _ranks(tmp_path: Path, world: int, batch_size: int, route: str = "onnx") -> list[dict[str, np.ndarray]]:
    ended = run_ranks(world, [route, str(tmp_path), str(batch_size)])
    for e in ended:
        assert e.returncode == 0, (e.rank, e.stderr[-2000:])
    return [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(world)]


def _max_rel(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    keys = [k for k in a if not k.startswith("calibration|") and not k.endswith("|counts")]
    assert keys and set(keys) <= set(b)
    return max(float(np.max(np.abs(a[k] - b[k]) / np.maximum(np.abs(a[k]), 1e-30))) for k in keys)


def _check(single: dict[str, np.ndarray], ranks: list[dict[str, np.ndarray]], world: int, batches: int) -> None:
    for r in ranks[1:]:  # every rank holds bitwise the same statistics
        for k in ranks[0]:
            assert np.array_equal(ranks[0][k], r[k]), k
    assert int(ranks[0]["calibration|world_size"][0]) == world
    assert int(ranks[0]["calibration|batches"][0]) == batches
    for k, v in single.items():
        if k.endswith("|counts"):  # samples and batches over all ranks = one process's
            assert np.array_equal(ranks[0][k], v), k
    assert _max_rel(single, ranks[0]) <= ROUND_OFF


def test_two_ranks_equal_one_process_with_a_short_last_batch(tmp_path: Path) -> None:
    # 64 samples in batches of 14: 5 batches, the last one of 8; rank 0 runs 3, rank 1 runs 2
    _check(_single(14), _ranks(tmp_path, 2, 14), 2, 5)


@pytest.mark.slow(reason="three processes importing torch (~6 s)")
def test_three_ranks_uneven_and_a_rank_without_batches(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _check(_single(14), _ranks(tmp_path / "a", 3, 14), 3, 5)  # 2, 2 and 1 batches
    # 64 samples in batches of 32: 2 batches for 3 ranks; rank 2 runs none and still takes part
    _check(_single(32), _ranks(tmp_path / "b", 3, 32), 3, 2)


def test_one_process_report_says_world_size_1(tmp_path: Path) -> None:
    report = bnfold.fold(str(MODEL), data=str(DATA), batch_size=16, dry_run=True).report
    assert report.extra["calibration"] == {"world_size": 1, "samples": 64, "batches": 4}


def _initializers(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


@pytest.mark.slow(reason="torchrun with two bnfold processes (~8 s)")
def test_cli_under_torchrun_matches_one_process(tmp_path: Path) -> None:
    bnfold_exe = shutil.which("bnfold", path=str(Path(sys.executable).parent))
    assert bnfold_exe is not None
    common = [str(MODEL), "--data", str(DATA), "--batch-size", "14"]
    one = subprocess.run([bnfold_exe, "fold", *common, "-o", str(tmp_path / "one.onnx"), "--frozen-output",
                          str(tmp_path / "one_frozen.onnx"), "--report", str(tmp_path / "one.json")],
                         capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend",
                          "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--no-python", bnfold_exe, "fold",
                          *common, "-o", str(tmp_path / "two.onnx"), "--frozen-output",
                          str(tmp_path / "two_frozen.onnx"), "--report", str(tmp_path / "two.json")],
                         capture_output=True, text=True, timeout=180)
    assert two.returncode == 0, two.stderr[-3000:]
    # rank 0 alone prints the summary and writes: one summary, one "Wrote"
    assert two.stdout.count("BN found") == 1 and two.stdout.count("Wrote report") == 1, two.stdout
    assert "warning" not in two.stderr.replace("Warnings", "")  # rank 1's warnings are not shown
    r1, r2 = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert r1["calibration"] == {"world_size": 1, "samples": 64, "batches": 5}
    assert r2["calibration"] == {"world_size": 2, "samples": 64, "batches": 5}
    f1, f2 = _initializers(tmp_path / "one_frozen.onnx"), _initializers(tmp_path / "two_frozen.onnx")
    assert f1.keys() == f2.keys()
    # float32 statistics written from float64 values equal to round-off: at most one float32 ulp apart
    for k in f1:
        np.testing.assert_allclose(f2[k], f1[k], rtol=2 ** -23, atol=0, err_msg=k)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["one.onnx", "one_frozen.onnx", "one.json", "two.onnx", "two_frozen.onnx", "two.json"])


@pytest.mark.slow(reason="two bnfold processes importing torch (~6 s)")
def test_every_rank_ends_with_rank_0s_exit_code_when_only_rank_0_fails(tmp_path: Path) -> None:
    # verification (rank 0 alone) fails with zero tolerances: rank 1 calibrated fine, yet exits 1 too
    bnfold_exe = shutil.which("bnfold", path=str(Path(sys.executable).parent))
    assert bnfold_exe is not None
    out = tmp_path / "folded.onnx"
    ended = run_ranks(2, [], command=[bnfold_exe, "fold", str(MODEL), "--data", str(DATA), "--batch-size", "10",
                                      "-o", str(out), "--atol", "0", "--rtol", "0", "--no-noise-floor", "--no-repro"])
    assert [e.returncode for e in ended] == [1, 1], [e.stderr[-1000:] for e in ended]
    assert "failed verification" in ended[0].stderr and "BN found" in ended[0].stdout
    assert ended[1].stdout == "" and ended[1].stderr == ""  # rank 1 prints nothing: it did not fail itself
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow(reason="two bnfold processes importing torch (~6 s)")
def test_inspect_under_ranks_calibrates_together_and_rank_0_alone_prints(tmp_path: Path) -> None:
    # before, each rank inspected all the data on its own and printed the same tables: N copies
    bnfold_exe = shutil.which("bnfold", path=str(Path(sys.executable).parent))
    assert bnfold_exe is not None
    samples = MODEL.parent  # inference BNs: their stored statistics have a drift from the data's
    cmd = [bnfold_exe, "inspect", str(samples / "unfoldable.onnx"), "--data", str(samples / "unfoldable_calib.npz"),
           "--batch-size", "4", "--json"]
    ended = run_ranks(2, [], command=cmd)
    assert [e.returncode for e in ended] == [0, 0], [e.stderr[-1000:] for e in ended]
    assert ended[1].stdout == "" and ended[1].stderr == "", ended[1]
    alone = subprocess.run(cmd, capture_output=True, text=True, env={k: v for k, v in os.environ.items()
                                                                       if k not in ("WORLD_SIZE", "RANK")})
    assert alone.returncode == 0, alone.stderr
    two, one = json.loads(ended[0].stdout), json.loads(alone.stdout)
    assert [r["name"] for r in two] == [r["name"] for r in one]
    assert len(two) == 4 and all(r["drift"]["mean_shift_sigma_max"] > 0 for r in two)
    for a, b in zip(two, one):  # the merged statistics equal one process's to float64 round-off
        for key in ("mean_shift_sigma_max", "log_var_ratio_max"):
            x, y = (a["drift"] or {}).get(key), (b["drift"] or {}).get(key)
            assert (x is None and y is None) or abs(x - y) <= 1e-9 * max(1.0, abs(y)), (a["name"], key, x, y)
