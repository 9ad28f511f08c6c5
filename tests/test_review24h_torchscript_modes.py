"""review24h: a ``torch.jit.script``-ed model whose BNs are in training mode is exported in eval
mode (its modes do not survive the export) and calibrated by the ONNX pipeline with
``recalibrate='all'``; the report said ``mode_before: inference`` for those training-mode BNs
(a ``torch.jit.trace``-d one, whose export keeps training_mode=1, said ``training``). Every BN of
such a module is recorded as ``training`` now."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from cli_run import run_cli  # noqa: E402
from torch import nn  # noqa: E402

pytestmark = pytest.mark.slow


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.c(x)))


@pytest.mark.parametrize("training", [True, False])
def test_scripted_bn_mode_in_report(tmp_path: Path, training: bool) -> None:
    torch.manual_seed(0)
    ts = torch.jit.script(Net().train(training))
    ts.save(str(tmp_path / "m.ts"))
    np.save(tmp_path / "d.npy", np.random.RandomState(0).randn(8, 3, 8, 8).astype(np.float32))
    res = run_cli("fold", tmp_path / "m.ts", "--data", tmp_path / "d.npy", "--batch-size", "4",
                  "-o", tmp_path / "o.onnx", "--report", tmp_path / "r.json")
    assert res.returncode == 0, res.stderr
    bns = json.loads((tmp_path / "r.json").read_text())["bns"]
    assert [b["mode_before"] for b in bns] == ["training" if training else "inference"]
