"""The torchrun environment as the CLI reads it, the collective timeout, j mod N sharding, and the
rank-order merge (issue 17 point 1); no process group needed."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_run import run_cli
from distributed_workers import DATA, MODEL

from bnfold.data.sources import open_data
from bnfold.distributed import RankShard
from bnfold.distributed.combine import decode_stats, encode_stats, merge_ranks
from bnfold.distributed.group import DEFAULT_TIMEOUT_S, resolve_group, timeout_seconds
from bnfold.errors import BadInputError
from bnfold.formulas.stats import finalize, update
from bnfold.records import BnStats, InputSpec


def test_shards_take_batch_j_on_rank_j_mod_n() -> None:
    batches = list(range(5))
    for world in (1, 2, 3, 7):
        shards = [RankShard(batches, r, world) for r in range(world)]
        assert sorted(b for s in shards for b in s) == batches
        for r, s in enumerate(shards):
            assert list(s) == batches[r::world] and s.num_batches == len(batches[r::world])
    assert list(RankShard(batches, 6, 7)) == [] and RankShard(batches, 6, 7).num_batches == 0


def test_a_rank_reads_only_its_own_batches_of_a_file(tmp_path: Path) -> None:
    # NaN in batch 1 (samples 4..7), which is rank 1's of 2: rank 0 never reads it, so never fails;
    # rank 1 names it. Before, every rank built (and checked) every batch and skipped the others'.
    x = np.ones((14, 3), dtype=np.float32)
    x[5, 1] = np.nan
    np.save(tmp_path / "x.npy", x)
    data = open_data(tmp_path / "x.npy", [InputSpec("x", np.dtype(np.float32), (None, 3))], 4)
    assert [b["x"].shape[0] for b in RankShard(data, 0, 2)] == [4, 4]  # batches 0 and 2
    with pytest.raises(BadInputError, match=r"samples 4\.\.7 overall, batch 1"):
        list(RankShard(data, 1, 2))
    assert [b["x"].shape[0] for b in RankShard(data, 2, 3)] == [4]  # batch 2 only


def test_merge_in_rank_order_equals_one_pass_and_travels_every_field() -> None:
    rng = np.random.default_rng(3)
    moments = [(rng.normal(size=4), rng.uniform(0.5, 2, size=4), m) for m in (10, 10, 10, 10, 3)]
    one = BnStats(channels=4)
    parts = [BnStats(channels=4) for _ in range(3)]
    for j, (mu, var, m) in enumerate(moments):
        update(one, mu, var, m)
        update(parts[j % 3], mu, var, m)
    merged = merge_ranks([decode_stats(encode_stats({"bn": p})) for p in parts])["bn"]
    a, b = finalize(one, "unbiased", "bn"), finalize(merged, "unbiased", "bn")
    assert (a.samples, a.batches) == (b.samples, b.batches) == (43, 5)
    # float64 sums added in another order: a few ulps (1e-12 relative: a wide margin)
    for x, y in ((a.mean, b.mean), (a.var_unbiased, b.var_unbiased), (a.var_pooled, b.var_pooled)):
        np.testing.assert_allclose(y, x, rtol=1e-12, atol=0)
    # twice the same merge, bitwise the same result (what every rank computes)
    again = merge_ranks([decode_stats(encode_stats({"bn": p})) for p in parts])["bn"]
    assert all(np.array_equal(getattr(merged, f), getattr(again, f)) for f in ("sum_mu", "pooled_m2"))


def test_timeout_from_option_env_or_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BNFOLD_DIST_TIMEOUT", raising=False)
    assert timeout_seconds() == DEFAULT_TIMEOUT_S
    monkeypatch.setenv("BNFOLD_DIST_TIMEOUT", "12.5")
    assert timeout_seconds() == 12.5 and timeout_seconds(3) == 3
    monkeypatch.setenv("BNFOLD_DIST_TIMEOUT", "soon")
    with pytest.raises(BadInputError, match="not a number of seconds"):
        timeout_seconds()


def test_distributed_true_without_a_group_is_bad_input() -> None:
    assert resolve_group("auto") is None and resolve_group(False) is None
    with pytest.raises(BadInputError, match="needs an initialised torch.distributed process group"):
        resolve_group(True)
    with pytest.raises(BadInputError, match="use 'auto', True or False"):
        resolve_group("yes")


def test_cli_with_an_incomplete_torchrun_environment_says_what_is_missing(tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    proc = run_cli("fold", MODEL, "--data", DATA, "-o", out, env={"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0",
                                                                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": ""})
    assert proc.returncode == 3
    assert proc.stderr.strip().splitlines() == [
        "bnfold: error: WORLD_SIZE=2 asks for a distributed run but MASTER_PORT is not set; launch with torchrun "
        "(or set all of WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)"]
    assert list(tmp_path.iterdir()) == []


def test_onnx_only_install_under_torchrun_is_one_line(tmp_path: Path) -> None:
    # torch made unimportable in a child process: what an ONNX-only install sees under torchrun
    code = ("import sys; sys.modules['torch'] = None; from bnfold.cli.main import main; "
            f"sys.exit(main(['fold', {str(MODEL)!r}, '--data', {str(DATA)!r}, '-o', {str(tmp_path / 'o.onnx')!r}]))")
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999",
           "PATH": str(Path(sys.executable).parent)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "bnfold: error: WORLD_SIZE=2 asks for a distributed run, which needs torch (pip install 'bnfold[torch]'); "
        "or run bnfold without torchrun"]
    assert list(tmp_path.iterdir()) == []


def test_a_rank_s_onnxruntime_session_takes_torch_s_thread_count() -> None:
    # N ranks on one machine: onnxruntime's default (a thread per core in every process) oversubscribes;
    # each rank's calibration session gets torch's count (OMP_NUM_THREADS, 1 per process under torchrun)
    import onnx
    import torch

    from bnfold.distributed import threads_per_rank
    from bnfold.stages.calibrate import _session

    assert threads_per_rank() == torch.get_num_threads()
    model = onnx.load(str(MODEL))
    sess = _session(model, {}, threads=1)
    assert sess.get_session_options().intra_op_num_threads == 1
