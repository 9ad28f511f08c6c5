"""bnfold.torch.kernels: one-pass float64 sums and sums of squares (numba) against numpy.

The reference is numpy's float64 (or long double) sum of the same values. A float32 value's
square is exact in float64, so the kernels' only error is float64 addition: a relative 1e-13 is
a hundred times looser than what a sum of 10^5 terms can lose in the worst case (~1e-11 is the
naive bound; vectorised pairwise sums measure ~1e-16).
"""
from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bnfold.torch import kernels  # noqa: E402
from bnfold.torch.moments import TARGET, Scratch, cpu_batch_moments  # noqa: E402


@pytest.fixture(autouse=True)
def opt_in(monkeypatch):
    """The kernels are opt-in (``BNFOLD_NUMBA=1``); skipped where numba cannot run them."""
    monkeypatch.setenv(kernels.ENV, "1")
    if not kernels.enabled():
        pytest.skip(f"numba kernels unavailable: {kernels.reason_disabled()}")


def values(shape, dtype=np.float32, offset=0.0, seed=0) -> np.ndarray:
    return (offset + np.random.default_rng(seed).standard_normal(shape)).astype(dtype)


def reference(a: np.ndarray, axis: int) -> np.ndarray:
    b = a.astype(np.longdouble)
    return np.stack([b.sum(axis), (b * b).sum(axis)]).astype(np.float64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1), (64, 49), (300, 3136), (3, 100_003)])
def test_row_moments(shape, dtype):
    a = values(shape, dtype, offset=3.0)
    got = kernels.row_moments(a)
    assert got.shape == (2, shape[0]) and got.dtype == np.float64
    np.testing.assert_allclose(got, reference(a, 1), rtol=1e-13, atol=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1), (1, 5), (5, 1), (3, 2048), (6272, 256), (1001, 3)])
def test_column_moments(shape, dtype):
    a = values(shape, dtype, offset=-2.0)
    got = kernels.column_moments(a)
    assert got.shape == (2, shape[1]) and got.dtype == np.float64
    np.testing.assert_allclose(got, reference(a, 0), rtol=1e-13, atol=0)


def test_float32_squares_are_exact_in_float64():
    """Offset 1e4 over a spread of 1: float32 sums of squares lose ~1e-7 of E[x^2], which is
    1e8 times the variance; the kernels' float64 sums keep E[x^2] - mean^2 to ~1e-7 of it."""
    a = values((4, 4096), offset=1e4)
    s, q = kernels.row_moments(a)
    ref = reference(a, 1)
    np.testing.assert_allclose(q, ref[1], rtol=1e-14)  # float64 addition only
    b = a.astype(np.longdouble)
    var = ((b - b.mean(1, keepdims=True)) ** 2).mean(1).astype(np.float64)
    got = q / a.shape[1] - (s / a.shape[1]) ** 2
    np.testing.assert_allclose(got, var, rtol=1e-6)
    f32 = np.square(a).sum(1, dtype=np.float32) / a.shape[1] - (a.sum(1, dtype=np.float32) / a.shape[1]) ** 2
    assert np.abs(f32 / var - 1).max() > 1e-2  # the float32 formula would be off: the test has teeth


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_propagate(bad):
    """fastmath without nnan/ninf: a nan or inf reaches the sums (the caller names the BN)."""
    a = values((3, 50))
    a[1, 7] = bad
    s, q = kernels.row_moments(a)
    assert np.isfinite(s[[0, 2]]).all() and np.isfinite(q[[0, 2]]).all()
    assert not np.isfinite(s[1]) and not np.isfinite(q[1])
    c = kernels.column_moments(a.T.copy())
    assert not np.isfinite(c[:, 1]).any() and np.isfinite(c[:, [0, 2]]).all()


def test_threads_follow_torch():
    import numba

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        kernels.row_moments(values((8, 8)))
        assert numba.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_env_switch_turns_the_kernels_off(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "0")
    assert not kernels.enabled()
    assert kernels.reason_disabled() == f"{kernels.ENV}=0"
    x = torch.from_numpy(values((2, 3, 8, 8), offset=1e4))
    mean, var, _ = cpu_batch_moments(x, Scratch())  # the torch path, still right
    b = x.double().numpy().astype(np.longdouble)
    ref = ((b - b.mean((0, 2, 3), keepdims=True)) ** 2).mean((0, 2, 3)).astype(np.float64)
    np.testing.assert_allclose(var, ref, rtol=1e-5)


def _in_child() -> tuple[str | None, list[float], list[float]]:
    torch.set_num_threads(1)
    x = torch.from_numpy(values((2, 3, 8, 8), offset=0.5))
    mean, var, _ = cpu_batch_moments(x, Scratch())
    return kernels.reason_disabled(), mean.tolist(), var.tolist()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_falls_back_to_torch():
    """numba stops a forked child that starts its GNU OpenMP pool again; the child must take the
    torch path instead (and get the same moments)."""
    x = torch.from_numpy(values((2, 3, 8, 8), offset=0.5))
    mean, var, _ = cpu_batch_moments(x, Scratch())
    assert kernels.enabled()
    with multiprocessing.get_context("fork").Pool(1) as pool:
        reason, child_mean, child_var = pool.apply(_in_child)
    assert reason is not None and "forked" in reason
    np.testing.assert_allclose(child_mean, mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(child_var, var, rtol=1e-5)


def two_values(shape, lo=993.56274, hi=995.6324, seed=0) -> np.ndarray:
    """Half lo, half hi at random: a mean ~965 standard deviations off, and only two distinct
    values, so the rounding errors of a long float64 sum do not average out."""
    rng = np.random.default_rng(seed)
    return np.where(rng.random(shape) < 0.5, np.float32(lo), np.float32(hi)).astype(np.float32)


def two_pass(a: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    b = a.astype(np.float64)
    return ((b - b.mean(axes, keepdims=True)) ** 2).mean(axes)


@pytest.mark.parametrize("layout", ["rows", "columns", "channels_last"])
def test_long_sums_keep_the_variance(layout):
    """Four million values per channel with E[x^2] / var ~ 9.3e5 (found by review): one running
    float64 total per row or column lost 1.6e-11 of the sum of squares, 1e-5 of the variance;
    the partial sums and the adaptive limit keep it within TARGET (2^-24, ~6e-8), centring where
    the bound says so."""
    if layout == "rows":
        a = two_values((1, 2, 2048, 2048))
        axes = (0, 2, 3)
    elif layout == "columns":
        a = two_values((1 << 22, 2))
        axes = (0,)
    else:
        a = two_values((1, 2048, 2048, 2)).transpose(0, 3, 1, 2)  # channels-last (1, 2, 2048, 2048)
        axes = (0, 2, 3)
    x = torch.from_numpy(a)
    mean, var, _ = cpu_batch_moments(x, Scratch())
    ref = two_pass(a, axes)
    np.testing.assert_allclose(var, ref, rtol=2 * TARGET[torch.float32])


@pytest.mark.parametrize("length, parts", [(49, 1), (1024, 1), (100_003, 1), (4096, 2), (1 << 22, 2), (100_003, 3)])
def test_adds_bound_the_rounding(length, parts):
    """The measured relative error of the kernels' sum of squares stays under the bound the
    cancellation test uses (row_adds / column_adds * 2^-53), on values whose roundings all go
    the same way (two distinct values). parts == 1: one row; else a column on that many threads."""
    if parts == 1:
        a = two_values((1, length))
        got = kernels.row_moments(a)[1, 0]
        bound = kernels.row_adds(length)
    else:
        a = two_values((length, 1))
        before = torch.get_num_threads()
        torch.set_num_threads(parts)
        try:
            got = kernels.column_moments(a)[1, 0]
            bound = kernels.column_adds(length, kernels.parts())
        finally:
            torch.set_num_threads(before)
    ref = float((a.astype(np.longdouble) ** 2).sum())
    assert abs(got / ref - 1) <= bound * 2.0 ** -53
