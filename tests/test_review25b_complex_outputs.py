"""Review 25b: a complex output was compared as integers (``astype(int64)``: the imaginary part
dropped, the real part truncated), so a folded module whose complex output was wrong by less than 1,
or only in its imaginary part, passed the torch and export checks with max_abs 0. Complex outputs
are now compared by real and imaginary parts within their parts' float tolerance."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from bnfold.verification.compare import compare_outputs


def _one(ref: np.ndarray, cand: np.ndarray):  # noqa: ANN202
    (m,) = compare_outputs({"y": ref}, {"y": cand})
    return m


def test_complex_imaginary_part_is_compared() -> None:
    ref = (np.linspace(-1, 1, 12) + 1j * np.linspace(0, 2, 12)).astype(np.complex64)
    m = _one(ref, ref.real.astype(np.complex64))  # imaginary part lost
    assert not m.passed and m.max_abs == pytest.approx(2.0)


def test_complex_small_real_error_is_compared() -> None:
    ref = (np.linspace(-1, 1, 12) + 1j).astype(np.complex64)
    m = _one(ref, ref + np.complex64(0.25))
    assert not m.passed and m.max_abs == pytest.approx(0.25)


def test_complex_within_tolerance_passes() -> None:
    ref = (np.linspace(-1, 1, 12) + 1j).astype(np.complex64)
    m = _one(ref, ref + np.complex64(1e-7))
    assert m.passed and m.dtype == "complex64" and m.atol > 0


def test_torch_check_compares_a_complex_output(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from torch import nn

    import bnfold.torch as bt

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn(self.conv(x))
            return torch.complex(y, 2 * y)

    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = bt.convert(M().train(), str(data), str(tmp_path / "out.pt2"))
    (out,) = result.torch_check.outputs
    assert out.dtype == "complex64" and out.max_abs > 0 and out.atol > 0 and result.passed
