"""One calibration per process (a script, the CLI) pays every import (issue 16 point 4).

``import bnfold.torch`` and a default ``calibrate`` must not load onnx (whose ml_dtypes import was
measured at 0.6 s here) nor numba (0.2 s import + ~0.3 s loading its cached kernels, while the warm
kernels are no faster than torch's reductions: benchmarks/torch_one_shot.py). Each check runs in
a fresh interpreter, so no other test's imports hide a regression.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")

_HEAVY = ("onnx", "onnxruntime", "ml_dtypes", "numba")

_SCRIPT = f"""
import json, sys
import torch
import bnfold.torch
model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
# BN inputs of 2 x 4 x 160 x 160 values: past moments.KERNEL_MAX, so the moments path (numba or torch) runs
frozen, stats = bnfold.torch.calibrate(model, [torch.randn(2, 3, 162, 162) for _ in range(2)])
assert list(stats) == ["1"]
print(json.dumps(sorted(m for m in {_HEAVY!r} if m in sys.modules)))
"""


def _loaded(env_numba: str | None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "BNFOLD_NUMBA"}
    if env_numba is not None:
        env["BNFOLD_NUMBA"] = env_numba
    out = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, check=True)
    loaded: list[str] = json.loads(out.stdout.strip().splitlines()[-1])
    return loaded


def test_default_calibrate_loads_neither_onnx_nor_numba():
    assert _loaded(None) == []


@pytest.mark.slow
def test_numba_only_when_asked_for():
    pytest.importorskip("numba")
    assert _loaded("1") == ["numba"]
    assert _loaded("0") == []


def test_lazy_names_are_the_functions_even_after_their_submodules_load():
    """``bnfold.torch.fold``/``.convert`` are loaded on first use; loading the submodules of the
    same names elsewhere first must not turn the package's attributes into modules."""
    code = ("import bnfold.torch, bnfold.torch.convert, bnfold.torch.fold, types; "
            "from bnfold.torch import fold, convert, TorchFoldResult, load_model_file; "
            "assert all(callable(f) and not isinstance(f, types.ModuleType) for f in "
            "(fold, convert, bnfold.torch.fold, bnfold.torch.convert)), (fold, convert)")
    subprocess.run([sys.executable, "-c", code], check=True)
