"""A float64 PyTorch model written as `.onnx`: onnxruntime's CPU provider has no float64 Conv, so
the export check cannot load it (review24h). The one line names the way out (a .pt2 or .pt output,
or float32), and a .pt2 output of the same model folds."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from cli_run import run_cli  # noqa: E402
from torch import nn  # noqa: E402

pytestmark = pytest.mark.slow(reason="torch.export and an ONNX export (~3 s)")


def test_float64_model_to_onnx_names_the_outputs_that_work(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).double().eval()
    ep = torch.export.export(model, (torch.randn(2, 3, 8, 8, dtype=torch.float64),))
    torch.export.save(ep, tmp_path / "m.pt2")
    np.savez(tmp_path / "d.npz", input=np.random.default_rng(0).standard_normal((8, 3, 8, 8)))
    res = run_cli("fold", tmp_path / "m.pt2", "--data", tmp_path / "d.npz", "-o", tmp_path / "o.onnx")
    assert res.returncode == 3 and not (tmp_path / "o.onnx").exists()
    [line] = res.stderr.strip().splitlines()
    assert "NOT_IMPLEMENTED" in line and "write a .pt2 or .pt output, or convert the model to float32" in line
    ok = run_cli("fold", tmp_path / "m.pt2", "--data", tmp_path / "d.npz", "-o", tmp_path / "o.pt2")
    assert ok.returncode == 0, ok.stderr
