"""Review of issue 17 (distributed): ranks that do not run the same calibration, and a rank that fails
before the calibration gather. Real bnfold CLI processes on gloo/loopback (tests/distributed_launch.py)."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from distributed_launch import run_ranks
from distributed_workers import DATA, MODEL

TRS_MODEL = MODEL.parent / "resnet_trs.onnx"  # a fixed 8x3x16x16 input: DATA (32x32) is bad input for it


def _bnfold() -> str:
    exe = shutil.which("bnfold", path=str(Path(sys.executable).parent))
    assert exe is not None
    return exe


def _per_rank(rank1: list[str], others: list[str]) -> list[str]:
    """A command that runs ``rank1`` on rank 1 and ``others`` elsewhere ($RANK from the launcher)."""
    q = lambda args: " ".join(f"'{a}'" for a in args)  # noqa: E731 - paths here hold no quote
    return ["sh", "-c", f'if [ "$RANK" = 1 ]; then exec {q(rank1)}; else exec {q(others)}; fi']


@pytest.mark.slow(reason="two bnfold processes importing torch (~6 s)")
def test_ranks_with_different_batch_sizes_refuse_to_merge(tmp_path: Path) -> None:
    # before the fix both ranks exited 0 and the report said 68 samples from a 64-sample file:
    # rank 0's batches of 14 and rank 1's batches of 8 overlapped and were merged silently
    out = tmp_path / "out.onnx"
    base = [_bnfold(), "fold", str(MODEL), "--data", str(DATA), "-o", str(out), "--batch-size"]
    ended = run_ranks(2, [], command=_per_rank(base + ["8"], base + ["14"]), extra_env={"BNFOLD_DIST_TIMEOUT": "60"})
    assert [e.returncode for e in ended] == [3, 3], [e.stderr[-800:] for e in ended]
    for e in ended:
        assert "rank 1 calibrates something else than rank 0" in e.stderr and "batch size 8" in e.stderr
        assert e.stderr.count("\n") == 1 and "Traceback" not in e.stderr  # one line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow(reason="two bnfold processes importing torch (~6 s)")
def test_ranks_with_different_model_weights_refuse_to_merge(tmp_path: Path) -> None:
    # same BN names and channels, other weights: before the fix the statistics of two different models
    # were merged and written (exit 0, verification passed, since it compares against the same mix)
    import numpy as np
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(MODEL))
    init = next(i for i in m.graph.initializer if len(i.dims) == 4)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(3), init.name))
    other = tmp_path / "in" / "other.onnx"
    other.parent.mkdir()
    onnx.save(m, str(other))
    outdir = tmp_path / "out"
    outdir.mkdir()
    tail = ["--data", str(DATA), "--batch-size", "14", "-o", str(outdir / "out.onnx")]
    ended = run_ranks(2, [], command=_per_rank([_bnfold(), "fold", str(other), *tail],
                                               [_bnfold(), "fold", str(MODEL), *tail]),
                      extra_env={"BNFOLD_DIST_TIMEOUT": "60"})
    assert [e.returncode for e in ended] == [3, 3], [e.stderr[-800:] for e in ended]
    assert all("rank 1 calibrates something else than rank 0 (model sha256" in e.stderr for e in ended)
    assert list(outdir.iterdir()) == []


@pytest.mark.slow(reason="two bnfold processes importing torch (~6 s)")
def test_a_rank_failing_before_the_gather_stops_the_others_at_once_with_its_error(tmp_path: Path) -> None:
    # rank 1's data does not fit its model: it fails while opening the data, before the calibration
    # gather. Before the fix it went to the outcome broadcast while rank 0 waited in the gather: both
    # hung for the whole timeout (300 s by default) and both printed "stopped answering", never the
    # real error. Now both stop within seconds: rank 1 with its own message, rank 0 with "rank 1 failed".
    tail = ["--data", str(DATA), "--batch-size", "8", "-o", str(tmp_path / "out.onnx")]
    ended = run_ranks(2, [], command=_per_rank([_bnfold(), "fold", str(TRS_MODEL), *tail],
                                               [_bnfold(), "fold", str(MODEL), *tail]),
                      extra_env={"BNFOLD_DIST_TIMEOUT": "120"})
    assert [e.returncode for e in ended] == [3, 3], [e.stderr[-800:] for e in ended]
    # far below the 120 s timeout: nobody waited it out (two torch imports take ~5 s here)
    assert max(e.seconds for e in ended) < 60
    assert ended[1].stderr.startswith("bnfold: error: calibration data") and "expects (8, 3, 16, 16)" in ended[1].stderr
    assert ended[0].stderr.startswith("bnfold: error: rank 1 failed: calibration data")
    assert "stopped answering" not in ended[0].stderr + ended[1].stderr
    assert list(tmp_path.iterdir()) == []


FACTORY = '''
import torch
from torch import nn


def build():  # seeds nothing: every process gets its own random weights
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).train()


def build_seeded():
    torch.manual_seed(0)
    return build()
'''


@pytest.mark.slow(reason="two bnfold processes importing torch (~6 s)")
@pytest.mark.parametrize("factory", ["build", "build_seeded"])
def test_model_factory_with_other_weights_on_each_rank_refuses_to_merge(tmp_path: Path, factory: str) -> None:
    # torch route: a factory without --weights that seeds nothing builds other weights on each rank;
    # before the fix their BN statistics were merged and rank 0 wrote its weights with the mix (exit 0)
    import numpy as np

    (tmp_path / "review17_factory.py").write_text(FACTORY)
    np.save(tmp_path / "x.npy", np.random.default_rng(1).standard_normal((40, 3, 8, 8)).astype(np.float32))
    out = tmp_path / "out" / "folded.pt2"
    cmd = ["sh", "-c", f"cd '{tmp_path}' && exec '{_bnfold()}' fold --model-factory review17_factory:{factory} "
                       f"--data x.npy --batch-size 8 -o '{out}'"]
    ended = run_ranks(2, [], command=cmd, extra_env={"BNFOLD_DIST_TIMEOUT": "60"})
    if factory == "build_seeded":  # the same weights everywhere: calibrates and writes as before
        assert [e.returncode for e in ended] == [0, 0], [e.stderr[-800:] for e in ended]
        assert out.is_file()
        return
    assert [e.returncode for e in ended] == [3, 3], [e.stderr[-800:] for e in ended]
    assert all("rank 1 calibrates something else than rank 0 (model state sha256" in e.stderr for e in ended)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


INTERRUPTED = '''
import numpy as np
import torch
from torch import nn

D = np.load(%r)["images"]


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 30 * 30, 4)).train()


def batches(rank=0, world_size=1):  # rank 1 is interrupted (Ctrl-C, or SIGTERM as an exception) at its 2nd batch
    for i in range(4):
        if rank == 1 and i == 1:
            raise KeyboardInterrupt
        yield D[i * 8:(i + 1) * 8]
'''


@pytest.mark.slow(reason="two bnfold processes importing torch (~6 s)")
@pytest.mark.parametrize("route", ["onnx", "torch"])
def test_an_interrupted_rank_stops_the_others_at_once(tmp_path: Path, route: str) -> None:
    # before the fix the interrupt (a BaseException) skipped the gather: rank 0 waited in it and rank 1 in
    # the outcome broadcast, both for the whole timeout, and both exited 3 with "stopped answering"
    (tmp_path / "review17_interrupted.py").write_text(INTERRUPTED % str(DATA))
    out = tmp_path / "out" / ("folded.onnx" if route == "onnx" else "folded.pt2")
    model = str(MODEL) if route == "onnx" else "--model-factory review17_interrupted:build"
    cmd = ["sh", "-c", f"cd '{tmp_path}' && exec '{_bnfold()}' fold {model} --data-factory "
                       f"review17_interrupted:batches -o '{out}'"]
    ended = run_ranks(2, [], command=cmd, extra_env={"BNFOLD_DIST_TIMEOUT": "120"})
    assert [e.returncode for e in ended] == [3, 130], [e.stderr[-800:] for e in ended]
    assert max(e.seconds for e in ended) < 60  # far below the 120 s timeout
    assert ended[0].stderr == "bnfold: error: rank 1 failed: interrupted (KeyboardInterrupt)\n"
    assert ended[1].stderr.strip() == "bnfold: interrupted"  # after the newline that ends a progress line
    assert not out.parent.exists()


API_WORKER = '''
import sys
import time
from datetime import timedelta

import torch.distributed as dist

import bnfold

dist.init_process_group("gloo", timeout=timedelta(seconds=60))
rank = dist.get_rank()
start = time.monotonic()
try:
    bnfold.fold(%r, data=%r, batch_size=0 if rank == 1 else 8, dry_run=True)
except Exception as exc:
    print(f"{type(exc).__name__}: {exc}")
print(f"seconds {time.monotonic() - start:.1f}")
if rank == 1:
    time.sleep(35)  # a training script that goes on: its process (and socket) stays open
'''


@pytest.mark.slow(reason="two processes importing torch (~5 s)")
def test_api_rank_failing_before_the_gather_sends_its_error(tmp_path: Path) -> None:
    # bnfold.fold in a process group: rank 1's bad batch_size raised before the calibration gather. Before
    # the fix rank 0 waited in the gather for the whole timeout (60 s here) while rank 1's process lived on,
    # and then said only "another rank stopped answering"
    script = tmp_path / "api_worker.py"
    script.write_text(API_WORKER % (str(MODEL), str(DATA)))
    ended = run_ranks(2, [], command=[sys.executable, str(script)], timeout=170)
    lines0 = ended[0].stdout.splitlines()
    assert lines0[0] == ("RankFailed: rank 1 failed: batch size must be at least 1, got 0; use batch_size=N with "
                         "N >= 1"), ended[0].stdout + ended[0].stderr[-1000:]
    assert float(lines0[1].split()[1]) < 30  # not the 60 s timeout
    assert ended[1].stdout.splitlines()[0].startswith("BadInputError: batch size must be at least 1")
