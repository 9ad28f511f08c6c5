"""review24h: two faults of the ExportedProgram -> ``.onnx`` route.

1. A tensor built in ``forward`` (``torch.tensor([...])``) is a lifted constant of the
   ExportedProgram, read through ``aten.lift_fresh_copy``, which torch.onnx's TorchScript exporter
   cannot export: ``bnfold fold m.pt2 -o out.onnx`` was exit 3 ('Exporting the operator
   aten::lift_fresh_copy ... is not supported') for an ordinary model that ``-o out.pt2`` folds.
   The rebuilt module reads it through ``aten.clone`` now.
2. Where torch.onnx.export fails, torch printed its whole IR graph ('Torch IR graph at exception:
   ...', dozens of lines) on stdout next to bnfold's one error line.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
from cli_run import run_cli, run_process  # noqa: E402
from torch import nn  # noqa: E402

pytestmark = pytest.mark.slow


class WithConstant(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.c(x)) + torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)


class Unexportable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cummax(self.bn(self.c(x)), 1)[0]


def _save(tmp_path: Path, model: nn.Module) -> tuple[Path, Path, np.ndarray]:
    torch.manual_seed(0)
    model.eval()
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
    ep = torch.export.export(model, (torch.randn(4, 3, 8, 8),))
    pt2 = tmp_path / "m.pt2"
    torch.export.save(ep, str(pt2))
    x = np.random.RandomState(0).randn(8, 3, 8, 8).astype(np.float32)
    data = tmp_path / "d.npy"
    np.save(data, x)
    return pt2, data, x


def test_lifted_constant_exports_to_onnx(tmp_path: Path) -> None:
    model = WithConstant()
    pt2, data, x = _save(tmp_path, model)
    out = tmp_path / "o.onnx"
    res = run_cli("fold", pt2, "--data", data, "-o", out)
    assert res.returncode == 0, res.stderr
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_failed_onnx_export_prints_no_graph(tmp_path: Path) -> None:
    pt2, data, _ = _save(tmp_path, Unexportable())
    out = tmp_path / "o.onnx"
    res = run_process("fold", pt2, "--data", data, "-o", out)
    assert res.returncode == 3
    assert "cummax" in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "Torch IR graph" not in res.stdout and "Torch IR graph" not in res.stderr, res.stdout[:500]
    assert not out.exists()
