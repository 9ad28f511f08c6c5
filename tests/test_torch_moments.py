"""bnfold.torch.moments: per-channel batch moments on the CPU against a numpy reference.

Every test of ``cpu_batch_moments`` runs on both paths: the numba kernels (float64 sums, one
read) and plain torch (``BNFOLD_NUMBA=0``: float32 row sums, two reads).

Tolerances: the activations are float32 (or float64) values; the reference is numpy's two-pass
over exactly those values in long double. The mean is good to a few ulps of the *deviations* (not of a
common offset), the variance to ``64 * eps`` relative: 7.6e-6 for float32, the test tolerance of
the calibration tests, which the raw-sum path's bound (``CANCEL * 3.2e-7`` = 2.6e-6) stays inside.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as hst  # noqa: E402

from bnfold.torch import kernels  # noqa: E402
from bnfold.torch.moments import (  # noqa: E402
    ROW,
    Scratch,
    cancel_limit,
    channels_last_view,
    cpu_batch_moments,
    row_length,
    row_sums,
    strided_moments,
)


@pytest.fixture(params=["numba", "torch"], autouse=True)
def path(request, monkeypatch):
    """The moments path under test: the numba kernels, or plain torch with ``BNFOLD_NUMBA=0``."""
    if request.param == "torch":
        monkeypatch.setenv(kernels.ENV, "0")
        assert not kernels.enabled()
    else:
        monkeypatch.setenv(kernels.ENV, "1")  # opt-in
    if request.param == "numba" and not kernels.enabled():
        pytest.skip(f"numba kernels unavailable: {kernels.reason_disabled()}")
    return request.param


def reference(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Two-pass moments in numpy's long double (80-bit on x86: a float64 reference's own mean is
    off by ~1e-7 at an offset of 1e9, which is 4e-14 of a variance of 0.25)."""
    a = x.double().numpy().astype(np.longdouble)
    axes = (0, *range(2, a.ndim))
    mean = a.mean(axis=axes, keepdims=True)
    var = ((a - mean) ** 2).mean(axis=axes)
    return mean.reshape(-1).astype(np.float64), var.astype(np.float64)


def assert_moments(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> None:
    ref_mean, ref_var = reference(x)
    eps = float(torch.finfo(x.dtype).eps)
    mean, var = np.asarray(mean), np.asarray(var)
    assert mean.dtype == var.dtype == np.float64
    spread = float(np.sqrt(ref_var.max())) + 1e-30
    # a few ulps of the deviations, plus the last bits of the float64 result itself
    np.testing.assert_allclose(mean, ref_mean, rtol=4 * 2.0 ** -52, atol=64 * eps * spread)
    np.testing.assert_allclose(var, ref_var, rtol=64 * eps, atol=1e-30)


def batch(shape, offset=0.0, scale=1.0, dtype=torch.float32, seed=7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (offset + scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)


# ----------------------------------------------------------------------------- rows


@pytest.mark.parametrize("spatial, expect", [
    (1, 1), (49, 49), (1024, 1024), (3136, 784), (12544, 896), (50176, 1024),
    (2053, 2053),  # a prime: whole rows
    (2 * 1031, 2 * 1031),  # twice a prime over ROW: the only divisors are 1 and 2, too short
    (64 * 1031, 64),  # 1031 is prime: the largest divisor up to ROW is 64, just long enough
])
def test_row_length(spatial, expect):
    got = row_length(spatial)
    assert got == expect
    assert spatial % got == 0


@given(spatial=hst.integers(1, 300_000))
@settings(max_examples=200, deadline=None)
def test_row_length_divides_and_is_short_where_it_can_be(spatial):
    got = row_length(spatial)
    assert spatial % got == 0
    if spatial <= ROW:
        assert got == spatial
    elif any(spatial % d == 0 for d in range(64, ROW + 1)):
        assert 64 <= got <= ROW and not any(spatial % d == 0 for d in range(got + 1, ROW + 1))
    else:
        assert got == spatial


@pytest.mark.parametrize("shape", [(3, 4, 40, 50), (2, 5, 2062), (1, 3, 8, 8, 20)])
def test_row_sums_are_per_channel_float64_sums(shape):
    x = batch(shape, offset=3.0)
    spatial = int(np.prod(shape[2:]))
    s, q = row_sums(x, row_length(spatial))
    a = np.moveaxis(x.double().numpy(), 1, 0).reshape(shape[1], -1)
    assert s.dtype == q.dtype == np.float64
    np.testing.assert_allclose(s, a.sum(1), rtol=1e-6)
    np.testing.assert_allclose(q, (a * a).sum(1), rtol=2e-6)
    s2, q2 = row_sums(x, row_length(spatial), squares=False)
    assert q2 is None and np.array_equal(s2, s)


# ----------------------------------------------------------------------------- the two paths


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(4, 3, 8, 8), (2, 5, 112, 112), (3, 4, 2062), (2, 3, 4, 6, 9)])
def test_small_offset_takes_raw_sums(shape, dtype):
    x = batch(shape, offset=0.5, dtype=dtype)
    mean, var, centred = cpu_batch_moments(x, Scratch())
    assert centred == 0
    assert_moments(x, mean, var)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("offset", [1e4, -3e5, 1e9])
@pytest.mark.parametrize("shape", [(4, 3, 8, 8), (2, 5, 56, 56), (3, 4, 2062)])
def test_large_offset_is_centred_and_keeps_its_digits(shape, offset, dtype):
    x = batch(shape, offset=offset, scale=0.5, dtype=dtype)
    mean, var, centred = cpu_batch_moments(x, Scratch())
    if offset ** 2 > cancel_limit(x) * 0.25:
        assert centred == shape[1]
    assert_moments(x, mean, var)
    # the naive float32 E[x^2] - E[x]^2 is far off here: the test has teeth
    if dtype == torch.float32:
        x64 = x.double()
        naive = (x * x).mean((0, *range(2, x.dim()))).double() - x64.mean((0, *range(2, x.dim()))) ** 2
        assert float((naive - torch.from_numpy(reference(x)[1])).abs().max()) > 1e-2


@pytest.mark.parametrize("offset", [3.0, 8.0, 15.0, 100.0, 1e3, 3e4])
@pytest.mark.parametrize("shape", [(1, 1, 100_000), (4, 2, 12_500), (8, 16, 32, 32), (8, 64, 14, 14)])
def test_float64_offsets_of_a_few_to_thousands_of_spreads_keep_float64_digits(shape, offset):
    """Between "no offset" and "centred for sure" (stop 23: float64's raw sums were taken up to
    E[x^2] = 1e6 var, and a mean 8-1000 spreads off lost up to 3e4 times the tolerance in the
    variance on the torch path: its float64 row sums round like float32's do, relative to E[x^2])."""
    x = batch(shape, offset=offset, dtype=torch.float64, seed=1)
    mean, var, _ = cpu_batch_moments(x, Scratch())
    assert_moments(x, mean, var)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cancellation_boundary(dtype):
    """Just inside the CANCEL ratio the raw sums are used and still within tolerance; just
    outside, the batch is centred."""
    c = cancel_limit(batch((4, 2, 64, 64), dtype=dtype))
    shape = (4, 2, 64, 64)
    base = batch(shape, seed=3, dtype=dtype)
    base = (base - base.mean((0, 2, 3), keepdim=True)) / base.std((0, 2, 3), unbiased=False, keepdim=True)
    inside = base + 0.97 * np.sqrt(c - 1)  # E[x^2] / var = 1 + mu^2 ~ 0.94 c
    outside = base + 1.03 * np.sqrt(c - 1)
    mean, var, centred = cpu_batch_moments(inside, Scratch())
    assert centred == 0
    assert_moments(inside, mean, var)
    mean, var, centred = cpu_batch_moments(outside, Scratch())
    assert centred == 2
    assert_moments(outside, mean, var)


@pytest.mark.parametrize("far", [[2], [0, 3], [1, 2, 3]])
def test_only_the_channels_far_off_are_centred(far):
    x = batch((3, 5, 20, 20))
    x[:, far] = x[:, far] * 1e-2 + 1e3
    mean, var, centred = cpu_batch_moments(x, Scratch())
    assert centred == len(far)
    assert_moments(x, mean, var)
    # the raw formula on those channels would have lost digits: the test has teeth
    s = x.double().sum((0, 2, 3))
    q = x.square().sum((0, 2, 3)).double()
    m = x.numel() // x.shape[1]
    naive = q / m - (s / m) ** 2
    ref = torch.from_numpy(reference(x)[1])
    assert float(((naive - ref).abs() / ref)[far].max()) > 1e-3


def test_squares_past_float32_range_are_centred(path):
    """1e20 + 1e17 * N(0, 1): x^2 overflows float32 (torch's raw sum of squares is inf; the
    kernels' float64 one is not), the centred values' squares do not; the moments are finite
    and right."""
    x = batch((2, 3, 20, 20), offset=1e20, scale=1e17)
    mean, var, centred = cpu_batch_moments(x, Scratch())
    if path == "torch":
        assert centred == 3
    assert np.isfinite(var).all()
    assert_moments(x, mean, var)


def test_constant_and_zero_channels():
    x = batch((2, 4, 20, 20))
    x[:, 0] = 0.0
    x[:, 1] = 7.25
    x[:, 2] = -1e-30
    mean, var, _ = cpu_batch_moments(x, Scratch())
    assert_moments(x, mean, var)
    assert var[0] == 0.0 and var[1] == 0.0 and var[2] >= 0.0
    assert mean[1] == 7.25


@pytest.mark.parametrize("shape", [(16, 3), (4, 3, 7), (2, 3, 3, 5)])
def test_small_spatial_size(shape, path):
    """torch: the strided path (rows too short to pay); numba: rows of the spatial size, or the
    columns of an (N, C) batch, centred like any other (offset 1e4 over a spread of 1)."""
    x = batch(shape, offset=1e4)
    mean, var, centred = cpu_batch_moments(x, Scratch())
    assert centred == (0 if path == "torch" else shape[1])  # the strided path counts none
    assert_moments(x, mean, var)


def _moved(x: torch.Tensor) -> torch.Tensor:
    """A view of x with the channels innermost in memory (as after a permute of NHWC data)."""
    return x.movedim(1, -1).contiguous().movedim(-1, 1)


LAST = {
    "channels_last-2d": ((4, 6, 20, 20), lambda x: x.contiguous(memory_format=torch.channels_last)),
    "channels_last-3d": ((2, 5, 4, 6, 9), lambda x: x.contiguous(memory_format=torch.channels_last_3d)),
    "moved-1d": ((3, 7, 500), _moved),
    "moved-2d": ((4, 6, 20, 20), _moved),
}


@pytest.mark.parametrize("offset", [0.5, 1e4])
@pytest.mark.parametrize("case", sorted(LAST))
def test_channels_last_takes_the_column_path(case, offset):
    shape, make = LAST[case]
    x = make(batch(shape, offset=offset))
    assert not x.is_contiguous() and channels_last_view(x) is not None
    mean, var, centred = cpu_batch_moments(x, Scratch())
    assert centred == (shape[1] if offset > 1 else 0)
    assert_moments(x, mean, var)
    mean2, var2 = strided_moments(x, Scratch())
    assert mean2.dtype == var2.dtype == torch.float64
    assert_moments(x, mean2.numpy(), var2.numpy())


def test_channels_last_centres_only_the_channels_far_off():
    x = batch((3, 5, 20, 20))
    x[:, [1, 4]] = x[:, [1, 4]] * 1e-2 + 1e3
    x = x.contiguous(memory_format=torch.channels_last)
    mean, var, centred = cpu_batch_moments(x, Scratch())
    assert centred == 2
    assert_moments(x, mean, var)


def test_channels_last_with_an_awkward_row_count_takes_the_strided_path():
    """N * spatial = 2 * 1031 rows: no block length between 8 and 256 divides it, and one float32
    sum over all rows would be long; the strided path is exact at any length."""
    x = _moved(batch((2, 3, 1031), offset=0.5))
    assert channels_last_view(x) is not None
    mean, var, centred = cpu_batch_moments(x, Scratch())
    assert centred == 0
    assert_moments(x, mean, var)


def test_other_strided_layouts_take_the_strided_path():
    x = batch((4, 6, 20, 40))[..., ::2]  # every other column: neither layout
    assert channels_last_view(x) is None and not x.is_contiguous()
    mean, var, centred = cpu_batch_moments(x, Scratch())
    assert centred == 0
    assert_moments(x, mean, var)


def test_input_that_requires_grad():
    """Calibration data that requires grad reaches a first BN as it is (no_grad does not clear
    the flag of a leaf): its moments are read without autograd complaining."""
    x = batch((2, 3, 8, 8), offset=2.0).requires_grad_()
    with torch.no_grad():
        mean, var, _ = cpu_batch_moments(x, Scratch())
    assert_moments(x.detach(), mean, var)
    mean, var, _ = cpu_batch_moments(x, Scratch())  # and with grad mode on
    assert_moments(x.detach(), mean, var)


def test_input_is_not_modified():
    x = batch((2, 3, 32, 32), offset=1e4)
    before = x.clone()
    cpu_batch_moments(x, Scratch())
    strided_moments(x, Scratch())
    assert torch.equal(x, before)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_come_out_non_finite(bad):
    """The caller (calibration) names the BN that saw them; moments must not hide them."""
    x = batch((2, 3, 32, 32))
    x[1, 2, 5, 5] = bad
    mean, var, _ = cpu_batch_moments(x, Scratch())
    assert np.isfinite(mean[:2]).all() and np.isfinite(var[:2]).all()
    assert not (np.isfinite(mean[2]) and np.isfinite(var[2]))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=hst.integers(1, 4), c=hst.integers(1, 5), spatial=hst.lists(hst.integers(1, 40), min_size=0, max_size=3),
       offset=hst.sampled_from([0.0, 0.3, 2.0, -5.0, 1e3, 1e5]), scale=hst.sampled_from([1e-3, 1.0, 1e3]),
       seed=hst.integers(0, 2**16), moved=hst.booleans())
def test_moments_match_float64_property(n, c, spatial, offset, scale, seed, moved):
    x = batch((n, c, *spatial), offset=offset * scale, scale=scale, seed=seed)
    if moved and spatial:
        x = _moved(x)  # channels innermost: the column path where the size allows
    if x.numel() // c < 2:
        return
    mean, var, _ = cpu_batch_moments(x, Scratch())
    assert_moments(x, mean, var)


def test_scratch_buffer_is_shared_and_grows():
    s = Scratch()
    a = s.like(torch.ones(2, 3))
    b = s.like(torch.ones(1, 4))
    assert a.data_ptr() == b.data_ptr() and b.shape == (1, 4)
    c = s.like(torch.ones(5, 5))
    assert c.shape == (5, 5) and c.numel() == 25
    assert s.like(torch.ones(2, dtype=torch.float64)).dtype == torch.float64


# ----------------------------------------------------------------------------- torch's BN kernel (small batches)


def test_the_bn_kernel_passes_its_exactness_check_here():
    """The calibration of small batches rests on it (torch 2.13's CPU kernel sums in double)."""
    moments_mod = pytest.importorskip("bnfold.torch.moments")
    assert moments_mod.kernel_moments_exact()


def test_a_kernel_that_sums_in_float_fails_the_exactness_check(monkeypatch):
    """The check has teeth: a BN kernel whose sums are float32 (as torch's channels-last code
    has them) misses the check batch's mean by several ulps."""
    import bnfold.torch.moments as mom

    def float_sums(x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
        rows = x.transpose(0, 1).reshape(x.shape[1], -1).numpy()
        mean = np.cumsum(rows, axis=1, dtype=np.float32)[:, -1] / np.float32(rows.shape[1])  # float32 adds
        running_mean.copy_(torch.from_numpy(mean))
        running_var.copy_(torch.from_numpy(((rows - mean[:, None]) ** 2).sum(1) / (rows.shape[1] - 1)))
        return x

    monkeypatch.setattr(mom, "_EXACT", None)
    monkeypatch.setattr(torch.nn.functional, "batch_norm", float_sums)
    assert not mom.kernel_moments_exact()
    monkeypatch.setattr(mom, "_EXACT", None)  # the real kernel's verdict for the rest of the run


@pytest.mark.parametrize("shape, takes", [
    ((8, 96, 8, 8), True), ((4, 3, 5), True),
    ((8, 16, 64, 64), False),          # large: cpu_batch_moments' row sums are faster
    ((64, 32), False),                 # (N, C): torch's channels-last code, float sums
    ((8, 4, 1, 1), False),             # one value per sample and channel: the same code
])
def test_which_batches_take_the_kernel(shape, takes):
    from bnfold.torch.moments import use_kernel_moments
    x = torch.randn(shape)
    assert use_kernel_moments(x) is takes
    if x.dim() == 4 and takes:
        assert not use_kernel_moments(x.contiguous(memory_format=torch.channels_last))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("offset", [0.0, 3.0, 15.0, 17.0, 1e4, -3e5, 1e9])
@pytest.mark.parametrize("shape", [(4, 3, 8, 8), (8, 96, 4, 4), (2, 5, 7)])
def test_kernel_moments_keep_the_digits_of_the_float64_reference(shape, offset, dtype):
    """Channels near the mean/spread limit (16 spreads: 15 and 17) and far past it, with channels
    at no offset beside them: the far ones are recomputed in float64, the others keep the
    kernel's; both within the tolerance of cpu_batch_moments. ``y`` is the kernel's training BN."""
    from bnfold.torch.moments import kernel_moments
    x = batch(shape, scale=1.0, dtype=dtype)
    x[:, ::2] += offset  # every other channel offset, the rest centred
    w, b = torch.rand(shape[1], dtype=dtype) + 0.5, torch.randn(shape[1], dtype=dtype)
    y, mean, var = kernel_moments(x, w, b, 1e-5, Scratch())
    assert_moments(x, mean, var)
    want = torch.nn.functional.batch_norm(x, None, None, w, b, True, 0.0, 1e-5)
    assert torch.equal(y, want)
