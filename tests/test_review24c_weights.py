"""review24c: --weights with a complex tensor for a real parameter or buffer (a BN's running_var)
was loaded by load_state_dict's copy_, which keeps the real part only (torch's 'Casting complex
values to real discards the imaginary part' as a warning line) and the run ended with exit 0 and
a written model. It is bad input: exit 3, one line naming the key and dtypes, nothing written."""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import pytest
from cli_run import run_cli

torch = pytest.importorskip("torch")

FACTORY = """
import torch.nn as nn
def build():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
"""


@pytest.mark.parametrize("key", ["1.running_var", "1.weight", "0.weight"])
def test_complex_weights_for_real_tensors_are_exit_3(tmp_path: Path, key: str) -> None:
    name = f"fac_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(FACTORY, encoding="utf-8")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    state = dict(model.state_dict())
    state[key] = state[key].to(torch.complex64) + 1j
    torch.save(state, tmp_path / "w.pt")
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32))
    before = set(os.listdir(tmp_path))
    proc = run_cli("fold", "--model-factory", f"{name}:build", "--weights", "w.pt", "--data", "calib.npy",
                   "-o", "out.pt2", "--no-verify", cwd=tmp_path)
    assert proc.returncode == 3, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnfold: error: "), proc.stderr
    assert key in lines[0] and "complex64" in lines[0] and "imaginary" in lines[0]
    assert set(os.listdir(tmp_path)) - {"__pycache__"} == before
