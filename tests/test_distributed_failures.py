"""Distributed calibration when a rank fails (issue 17 point 1): a rank with bad data sends its error
to the others; a rank killed with SIGKILL makes the others fail within the timeout; nothing is written."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from distributed_launch import run_ranks

pytestmark = pytest.mark.slow(reason="two or three processes importing torch per test (~5-10 s)")


@pytest.mark.parametrize("route", ["onnx", "torch"])
def test_a_rank_with_bad_data_stops_every_rank(tmp_path: Path, route: str) -> None:
    out = tmp_path / "folded.onnx"
    args = [route, str(tmp_path), "14"] + ([str(out)] if route == "onnx" else [])
    ended = run_ranks(3, args, extra_env={"BAD_RANK": "1"})
    said = "has NaN or Inf values" if route == "onnx" else "saw non-finite activations"  # the rank's own words
    assert [e.returncode for e in ended] == [3, 3, 3], [e.stderr[-500:] for e in ended]
    for e in ended:
        lines = [ln for ln in e.stderr.splitlines() if ln.startswith("worker error")]
        assert len(lines) == 1, e.stderr[-2000:]
        if e.rank == 1:  # its own message
            assert said in lines[0] and "rank 1 failed" not in lines[0], lines[0]
        else:  # the others name rank 1 and its one-line message
            assert "rank 1 failed:" in lines[0] and said in lines[0], lines[0]
    assert sorted(os.listdir(tmp_path)) == []  # nothing written on any rank


def test_a_killed_rank_fails_the_others_within_the_timeout(tmp_path: Path) -> None:
    out = tmp_path / "folded.onnx"
    ended = run_ranks(2, ["onnx", str(tmp_path), "14", str(out)],
                      extra_env={"DIE_RANK": "1", "BNFOLD_DIST_TIMEOUT": "20"}, timeout=120)
    dead, alive = ended[1], ended[0]
    assert dead.returncode == -9
    assert alive.returncode == 3, alive.stderr[-2000:]
    assert alive.seconds < 20 + 30  # the timeout, plus process start-up on a busy 2-core machine
    line = [ln for ln in alive.stderr.splitlines() if ln.startswith("worker error")]
    assert len(line) == 1 and "stopped answering" in line[0] and "BNFOLD_DIST_TIMEOUT" in line[0], alive.stderr[-2000:]
    assert os.listdir(tmp_path) == []
