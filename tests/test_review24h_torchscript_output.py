"""review24h: ``-o out.pt`` for a model returning ``{"a": y, "b": (y.sum(1), y.amax(1))}`` (a dict
with a tensor and a tuple) was exit 3 with 'torch.jit.trace failed: RuntimeError: Tracer cannot
infer type of {'a': tensor([[[[-5.5983e-01, ...' (300 characters of the output's values, no way
out). It says what TorchScript cannot hold and which outputs can."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from cli_run import run_cli  # noqa: E402
from torch import nn  # noqa: E402

pytestmark = pytest.mark.slow


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> dict:
        y = self.bn(self.c(x))
        return {"a": y, "b": (y.sum(1), y.amax(1))}


def test_untraceable_output_structure(tmp_path: Path) -> None:
    torch.export.save(torch.export.export(Mixed().train(), (torch.randn(4, 3, 8, 8),)), str(tmp_path / "m.pt2"))
    np.save(tmp_path / "d.npy", np.random.RandomState(0).randn(8, 3, 8, 8).astype(np.float32))
    res = run_cli("fold", tmp_path / "m.pt2", "--data", tmp_path / "d.npy", "--batch-size", "4",
                  "-o", tmp_path / "o.pt")
    assert res.returncode == 3
    assert "use a .pt2 or .onnx output" in res.stderr and "tensor(" not in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.pt").exists()
