"""Review of issue 17 (sufficiency): a tiny target_se is refused with one line (it overflowed
(worst / target)^2 into an internal OverflowError), in the CLI and the API."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from distributed_workers import DATA, MODEL

import bnfold
from bnfold.errors import BadInputError


def test_cli_refuses_a_target_finer_than_float32_statistics(tmp_path: Path) -> None:
    exe = shutil.which("bnfold", path=str(Path(sys.executable).parent))
    assert exe is not None
    done = subprocess.run([exe, "fold", str(MODEL), "--data", str(DATA), "--batch-size", "8", "-o",
                           str(tmp_path / "out.onnx"), "--target-se", "1e-300"], capture_output=True, text=True,
                          timeout=120)
    # before: "bnfold: internal error: OverflowError: (34, 'Numerical result out of range')"
    assert done.returncode == 2, done.stderr
    assert "--target-se" in done.stderr and "give at least 1e-06" in done.stderr and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("target", [1e-300, 1e-7])
def test_api_refuses_a_target_finer_than_float32_statistics(target: float) -> None:
    with pytest.raises(BadInputError, match=r"is below 1e-06, finer than the float32 statistics can hold"):
        bnfold.fold(str(MODEL), data=str(DATA), batch_size=8, dry_run=True, distributed=False, target_se=target)


def test_the_smallest_target_accepted_still_gives_a_sample_count() -> None:
    result = bnfold.fold(str(MODEL), data=str(DATA), batch_size=8, dry_run=True, distributed=False, target_se=1e-6)
    suff = [b.stats.sufficiency for b in result.report.bns if b.stats is not None]
    assert suff and all(s is not None and s.samples_for_target is not None and s.samples_for_target > 10 ** 9
                        for s in suff)
