"""review23: float64 batches on both moment paths keep the project's float64 tolerance
(``64 * eps`` relative in the variance, tests/test_torch_moments.py) around and above
``E[x^2] / var = 8``: (N, C) columns, channels-last and 3D/5D rows."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bnfold.torch import kernels  # noqa: E402
from bnfold.torch.moments import Scratch, cpu_batch_moments  # noqa: E402


@pytest.fixture(params=["numba", "torch"], autouse=True)
def path(request, monkeypatch):
    monkeypatch.setenv(kernels.ENV, "1" if request.param == "numba" else "0")
    if request.param == "numba" and not kernels.enabled():
        pytest.skip(f"numba kernels unavailable: {kernels.reason_disabled()}")
    return request.param


def reference_var(x: torch.Tensor) -> np.ndarray:
    a = x.numpy().astype(np.longdouble)
    axes = (0, *range(2, a.ndim))
    mean = a.mean(axis=axes, keepdims=True)
    return ((a - mean) ** 2).mean(axis=axes).astype(np.float64)


@pytest.mark.parametrize("ratio", [4.0, 8.0, 16.0, 30.0, 100.0])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("shape, layout", [((64, 16), None), ((256, 16), None), ((1024, 8), None),
                                           ((8, 16, 32, 32), torch.channels_last),
                                           ((4, 8, 6, 8, 8), torch.channels_last_3d),
                                           ((8, 16, 2000), None)])
def test_float64_variance_within_64_eps(shape, layout, seed, ratio):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) + (ratio - 1) ** 0.5
    if layout is not None:
        x = x.contiguous(memory_format=layout)
    _, var, _ = cpu_batch_moments(x, Scratch())
    np.testing.assert_allclose(var, reference_var(x), rtol=64 * 2.0 ** -52, atol=1e-30)
