"""``--data-factory`` under a distributed launch (issue 17 points 1 and 2 together).

A factory whose callable takes no ``rank`` returns the whole stream on every rank: bnfold keeps
batch j for rank j mod N, after re-chunking to ``--batch-size``, so the batches are the ones one
process makes. A factory that takes ``rank`` and ``world_size`` returns the rank's own part
(``DistributedSampler`` style) and is used as it is. Either way the merged statistics equal one
process's to float64 round-off (written as float32: at most one float32 ulp apart).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from distributed_launch import run_ranks
from distributed_workers import DATA, MODEL
from onnx import numpy_helper

pytest.importorskip("torch")

FACTORIES = textwrap.dedent(f"""
    import numpy as np

    X = np.load({str(DATA)!r})["images"]

    def whole():  # no rank: every rank gets everything, in source batches of 6 (re-chunked by --batch-size)
        return ({{"images": X[i:i + 6]}} for i in range(0, len(X), 6))

    def own_part(rank, world_size):  # batches of 10, j mod N: the rank's own part
        return [{{"images": X[i:i + 10]}} for j, i in enumerate(range(0, len(X), 10)) if j % world_size == rank]

    seen = []

    def records_rank(rank=None, world_size=None, **_):
        seen.append((rank, world_size))
        return whole()
""")


def _initializers(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def _fold(tmp_path: Path, name: str, world: int, factory: str, batch_size: int
          ) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    exe = shutil.which("bnfold", path=str(Path(sys.executable).parent))
    assert exe is not None
    frozen = tmp_path / f"{name}_frozen.onnx"
    cmd = [exe, "fold", str(MODEL), "--data-factory", factory, "--batch-size", str(batch_size),
           "-o", str(tmp_path / f"{name}.onnx"), "--frozen-output", str(frozen),
           "--report", str(tmp_path / f"{name}.json")]
    if world == 1:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(tmp_path)})
        assert done.returncode == 0, done.stderr
    else:
        ended = run_ranks(world, [], command=cmd, extra_env={"PYTHONPATH": str(tmp_path)})
        assert [e.returncode for e in ended] == [0] * world, [e.stderr[-800:] for e in ended]
    report = json.loads((tmp_path / f"{name}.json").read_text())
    return _initializers(frozen), report["calibration"]


@pytest.mark.slow(reason="three bnfold processes importing torch (~8 s)")
def test_data_factory_under_two_ranks_equals_one_process(tmp_path: Path) -> None:
    (tmp_path / "calfactories.py").write_text(FACTORIES)
    one, cal1 = _fold(tmp_path, "one", 1, "calfactories:whole", 10)
    whole, cal2 = _fold(tmp_path, "whole", 2, "calfactories:whole", 10)
    own, cal3 = _fold(tmp_path, "own", 2, "calfactories:own_part", 10)
    # each batch counted once: a rank that took the whole stream as its own part would double them
    # (the statistics alone would not show it: the same data twice has the same mean and variance)
    assert cal1 == {"world_size": 1, "samples": 64, "batches": 7}
    assert cal2["world_size"] == cal3["world_size"] == 2
    assert cal2 == cal3 == {"world_size": 2, "samples": 64, "batches": 7}
    assert one.keys() == whole.keys() == own.keys()
    for k in one:
        np.testing.assert_allclose(whole[k], one[k], rtol=2 ** -23, atol=0, err_msg=k)
        np.testing.assert_allclose(own[k], one[k], rtol=2 ** -23, atol=0, err_msg=k)


def test_factory_without_rank_is_marked_shared_and_with_rank_is_not(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from bnfold.data.factory import call_data_factory
    from bnfold.data.stream import SharedStream

    (tmp_path / "calfactories2.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert isinstance(call_data_factory("calfactories2:whole", rank=1, world_size=2), SharedStream)
    assert not isinstance(call_data_factory("calfactories2:whole"), SharedStream)  # one process: as returned
    assert isinstance(call_data_factory("calfactories2:own_part", rank=1, world_size=2), list)
    assert not isinstance(call_data_factory("calfactories2:records_rank", rank=1, world_size=2), SharedStream)
    import calfactories2  # type: ignore[import-not-found]
    assert calfactories2.seen == [(1, 2)]
