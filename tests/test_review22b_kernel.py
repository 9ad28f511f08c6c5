"""Review 22b: the small-batch path of torch's BN kernel (``moments.kernel_moments``).

Each test failed before its fix: float64 batches took the kernel's moments (its sums of doubles are
plain double sums, so the mean misses the long-double reference by several times the tolerance of
tests/test_torch_moments.py); a variance past what the kernel's float32 ``var_sum`` holds (m * var
over float32's range, with the variance itself well inside it) became inf, so calibrate refused
activations the other path calibrates; the once-per-process self-test crashed every calibration
under ``torch.set_default_dtype(torch.float64)`` and ran through a user's TorchFunctionMode.
"""
from __future__ import annotations

import importlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

import bnfold.torch.moments as mom  # noqa: E402
from bnfold.torch import calibrate  # noqa: E402
from bnfold.torch.moments import use_kernel_moments  # noqa: E402

calibrate_module = importlib.import_module("bnfold.torch.calibrate")


def reference(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    a = x.double().numpy().astype(np.longdouble)
    axes = (0, *range(2, a.ndim))
    mean = a.mean(axis=axes, keepdims=True)
    var = ((a - mean) ** 2).mean(axis=axes)
    return mean.reshape(-1).astype(np.float64), var.astype(np.float64)


@pytest.mark.parametrize("shape", [(8, 32, 16, 16), (1, 4, 100, 250), (8, 2, 6000)])
@pytest.mark.parametrize("offset", [8.0, 15.0])
def test_float64_calibration_keeps_the_float64_digits(shape, offset):
    """The tolerance of tests/test_torch_moments.py (a few ulps of the deviations) on what
    calibrate feeds its accumulator for a small float64 batch."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(shape, generator=g, dtype=torch.float64) + offset
    bn = {3: nn.BatchNorm1d, 4: nn.BatchNorm2d}[x.dim()](shape[1]).double()
    _, stats = calibrate(nn.Sequential(bn), [x], estimator="pooled")
    ref_mean, ref_var = reference(x)
    eps = float(torch.finfo(torch.float64).eps)
    spread = float(np.sqrt(ref_var.max()))
    got = stats["0"].mean
    np.testing.assert_allclose(got, ref_mean, rtol=4 * 2.0 ** -52, atol=64 * eps * spread)


def test_float64_batches_do_not_take_the_kernel():
    assert not use_kernel_moments(torch.randn(8, 32, 16, 16, dtype=torch.float64))
    assert use_kernel_moments(torch.randn(8, 32, 16, 16))


@pytest.mark.parametrize("shape, spread", [((8, 4, 32, 32), 3e17), ((8, 4, 8, 8), 1e18)])
def test_a_variance_past_the_kernels_float32_sums_calibrates_as_on_the_other_path(shape, spread, monkeypatch):
    """m * var past float32's range (3.4e38), var itself far inside it: the kernel's var_sum is inf,
    and calibrate refused ("non-finite activations") what cpu_batch_moments calibrates."""
    g = torch.Generator().manual_seed(12)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * spread).float()
    frozen, stats = calibrate(nn.Sequential(nn.BatchNorm2d(4)), [x])
    monkeypatch.setattr(calibrate_module, "use_kernel_moments", lambda x: False)
    want_frozen, want = calibrate(nn.Sequential(nn.BatchNorm2d(4)), [x])
    np.testing.assert_allclose(stats["0"].var, want["0"].var, rtol=1e-6)
    np.testing.assert_allclose(stats["0"].mean, want["0"].mean, rtol=0, atol=1e-6 * spread)
    assert torch.isfinite(frozen[0].running_var).all()
    torch.testing.assert_close(frozen[0].running_var, want_frozen[0].running_var)


def test_the_self_test_under_a_float64_default_dtype(monkeypatch):
    monkeypatch.setattr(mom, "_EXACT", None)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert mom.kernel_moments_exact()
        frozen, _ = calibrate(nn.Sequential(nn.BatchNorm2d(4)).float(), [torch.randn(2, 4, 5, 5, dtype=torch.float32)])
    finally:
        torch.set_default_dtype(prev)
    assert frozen[0].running_var.dtype == torch.float32


def test_the_self_test_is_not_seen_by_a_users_torch_function_mode(monkeypatch):
    monkeypatch.setattr(mom, "_EXACT", None)
    seen: list[tuple[int, ...]] = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.batch_norm:
                seen.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    with Record():
        calibrate(nn.Sequential(nn.BatchNorm2d(4)), [torch.randn(2, 4, 5, 5)], inplace=True)
    assert seen == [(2, 4, 5, 5)]


def test_a_module_built_under_inference_mode_calibrates(monkeypatch):
    """Its parameters are inference tensors, which have no version counter: the deferred copy read
    one and every calibration of such a module crashed (RuntimeError, not a bnfold error)."""
    monkeypatch.setattr(mom, "_EXACT", None)  # the self-test in inference mode too
    with torch.inference_mode():
        module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        x = torch.randn(2, 3, 7, 7)
        frozen, _ = calibrate(module, [x])
    assert frozen is not module and frozen[0].weight.data_ptr() != module[0].weight.data_ptr()
    assert torch.equal(frozen[0].weight, module[0].weight)
    assert bool(torch.isfinite(frozen[1].running_var).all())
    assert not module[1].running_var.ne(1).any()  # the original's buffers untouched
