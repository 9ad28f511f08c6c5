"""bnfold.torch.export: what the written ExportedProgram accepts.

torch.export specialises a dimension of size 1 to a constant even under ``Dim.AUTO``: a model
exported from one calibration sample would accept batch size 1 only, and say nothing.
"""
from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from bnfold.torch.export import save_exported_program  # noqa: E402


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x, y):
        return torch.relu(self.conv(x)) + y.mean()


class FixedBatch(nn.Module):
    def forward(self, x):
        return x.view(4, -1)


@pytest.mark.parametrize("n", [1, 3])
def test_exported_program_keeps_a_dynamic_batch_from_any_example(tmp_path: Path, n: int) -> None:
    model = Net().eval()
    x, y = torch.randn(n, 3, 8, 8), torch.randn(n, 2)
    path = tmp_path / "m.pt2"
    notes = save_exported_program(model, (x,), {"y": y}, ["x"], path)
    assert notes == []
    loaded = torch.export.load(str(path)).module()
    x5, y5 = torch.randn(5, 3, 8, 8), torch.randn(5, 2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x5, y=y5), model(x5, y5))


def test_a_batch_the_model_fixes_is_said(tmp_path: Path) -> None:
    notes = save_exported_program(FixedBatch(), (torch.randn(4, 3),), {}, ["x"], tmp_path / "f.pt2")
    assert len(notes) == 1 and "static batch size" in notes[0] and "'x'" in notes[0]
