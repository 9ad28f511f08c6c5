"""The PyTorch route's noise floor (issue 15 point 1): the torch and export checks take the floor of
their reference from a float64 run of the module (``bnfold.torch.export.float64_oracle``).

The model is the issue's: Conv2d(3, 4, 1) with bias 3000, BatchNorm2d(4) in training mode, inputs
N(0, 1). Before the floor, both routes refused it ("the folded module diverged ... max abs diff
0.00147", "the ONNX export diverged from PyTorch eager ... 0.00143").
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn

import bnfold.torch as bt
from bnfold.torch import export as ex
from bnfold.verification.config import VerifyConfig
from bnfold.verification.noise_floor import MARGIN


class Offset(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def make_offset() -> Offset:
    torch.manual_seed(0)
    m = Offset()
    with torch.no_grad():
        m.conv.bias.fill_(3000.0)
    return m.train()


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "calib.npy"
    np.save(path, np.random.default_rng(0).standard_normal((64, 3, 8, 8)).astype(np.float32))
    return path


@pytest.mark.parametrize("suffix", [".pt2", ".onnx"])
def test_offset_module_passes_by_default_with_floor_and_margin(data: Path, tmp_path: Path, suffix: str) -> None:
    out = tmp_path / "out" / f"folded{suffix}"
    result = bt.convert(make_offset(), data, out, device="cpu")
    assert result.passed and result.output == out and out.is_file(), result.failed
    check = result.torch_check if suffix == ".pt2" else result.export_check
    assert check is not None and check.passed
    assert check.noise_floor == {"method": "float64", "margin": MARGIN}
    [o] = check.outputs
    assert o.floor_max is not None and o.max_abs > o.atol  # over atol: passed by the floor
    assert o.max_abs <= MARGIN * o.floor_max
    key = "torch_check" if suffix == ".pt2" else "export_check"
    assert result.report.extra[key]["noise_floor"] == {"method": "float64", "margin": MARGIN}
    assert "floor" in result.report.extra[key]["rule"]
    if suffix == ".onnx":  # then the ONNX fold's verification, with its own (perturbation) floor
        v = result.verification
        assert v is not None and v.passed and v.settings["noise_floor"]["method"] == "perturbation"


@pytest.mark.parametrize(("suffix", "failed"), [(".pt2", "torch_check"), (".onnx", "export_check")])
def test_offset_module_fails_the_strict_check(data: Path, tmp_path: Path, suffix: str, failed: str) -> None:
    """The issue's symptom, kept reachable: without the floor, rounding noise fails the check."""
    out = tmp_path / f"folded{suffix}"
    result = bt.convert(make_offset(), data, out, device="cpu", config=VerifyConfig(noise_floor=False))
    assert not result.passed and result.failed == failed and not out.exists()
    check = result.torch_check if failed == "torch_check" else result.export_check
    assert check is not None and check.noise_floor == "off" and check.outputs[0].floor_max is None
    assert check.max_abs > 1e-4


def test_oracle_floor_catches_10x_floor_on_one_channel() -> None:
    """compare_arrays with the float64 oracle: the float32 run passes against itself plus its own
    noise; 10x the floor on one channel fails."""
    module = make_offset().eval()
    with torch.no_grad():
        module.bn.running_mean.fill_(3000.0)
        module.bn.running_var.copy_((module.conv.weight.double() ** 2).sum((1, 2, 3)).float())
    x = {"x": torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))}
    ref = ex.eager_named(module, x)
    oracle = ex.float64_oracle(module, x)
    assert oracle is not None and oracle["output"].dtype == np.float64
    floor = np.abs(ref["output"].astype(np.float64) - oracle["output"]).max(axis=(0, 2, 3))
    assert floor.max() > 1e-5  # ill-conditioned: rounding of 3000 after the BN's scale
    same = ex.compare_arrays(ref, {"output": oracle["output"].astype(np.float32)}, 4, oracle=oracle)
    assert same["passed"]
    for c in range(4):
        bad = ref["output"].copy()
        bad[:, c] += np.float32(10 * floor.max())
        res = ex.compare_arrays(ref, {"output": bad}, 4, atol=(0.0, {}), rtol=(0.0, {}), oracle=oracle)
        assert not res["passed"], c
        assert res["outputs"][0]["floor_max"] == pytest.approx(floor.max())
