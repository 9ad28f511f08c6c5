"""review24h: an ExportedProgram whose forward fails on the data (here: exported at batch 4 with
``view(4, -1)``, calibrated at ``--batch-size 5``) ended in bnfold's one error line, but torch.fx had
already printed a traceback and the failing line of its generated code on stderr (fx's
``_WrappedCall`` prints them whenever a GraphModule's forward raises). The fold command drops them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from cli_run import run_process  # noqa: E402
from torch import nn  # noqa: E402

pytestmark = pytest.mark.slow


class Baked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(144, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.c(x)).view(4, -1))


def test_forward_failure_is_one_line(tmp_path: Path) -> None:
    torch.export.save(torch.export.export(Baked().train(), (torch.randn(4, 3, 8, 8),)), str(tmp_path / "m.pt2"))
    np.save(tmp_path / "d.npy", np.random.RandomState(0).randn(10, 3, 8, 8).astype(np.float32))
    res = run_process("fold", tmp_path / "m.pt2", "--data", tmp_path / "d.npy", "--batch-size", "5",
                      "-o", tmp_path / "o.onnx")
    assert res.returncode == 3
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "forward failed on calibration batch 1" in res.stderr
    assert not (tmp_path / "o.onnx").exists()
