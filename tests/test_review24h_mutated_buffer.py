"""review24h: an ExportedProgram whose forward writes a buffer that is not a BN's (``self.acc.add_(1)``)
was folded with no word: every forward bnfold runs (calibration batches, checks) changed the
buffer, and the folded and ``--frozen-output`` models held different values of it (a ``.pt``
pair differed by 70 % relative on the same input). A warning names the buffer now."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from cli_run import run_cli  # noqa: E402
from torch import nn  # noqa: E402

pytestmark = pytest.mark.slow


class Counter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.register_buffer("acc", torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.c(x))
        self.acc.add_(1.0)
        return y + self.acc.view(1, 4, 1, 1)


def _fold(tmp_path: Path, model: nn.Module) -> dict:
    ep = torch.export.export(model, (torch.randn(4, 3, 8, 8),))
    torch.export.save(ep, str(tmp_path / "m.pt2"))
    np.save(tmp_path / "d.npy", np.random.RandomState(0).randn(8, 3, 8, 8).astype(np.float32))
    res = run_cli("fold", tmp_path / "m.pt2", "--data", tmp_path / "d.npy", "--batch-size", "4",
                  "-o", tmp_path / "o.pt2", "--report", tmp_path / "r.json")
    assert res.returncode == 0, res.stderr
    return json.loads((tmp_path / "r.json").read_text())


def test_written_buffer_is_named(tmp_path: Path) -> None:
    report = _fold(tmp_path, Counter().train())
    assert any("writes buffer 'acc' in place" in w for w in report["warnings"]), report["warnings"]


def test_bn_statistics_alone_are_no_warning(tmp_path: Path) -> None:
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.c(x))

    report = _fold(tmp_path, Plain().train())
    assert not any("writes buffer" in w for w in report["warnings"]), report["warnings"]
