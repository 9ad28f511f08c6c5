"""Population statistics (math.md section 2) against brute-force float64 computations."""
from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnfold.errors import BadInputError
from bnfold.formulas.stats import batch_moments, finalize, merge, update
from bnfold.records import BnStats

# ---------------------------------------------------------------- brute force, from the formulas


def brute_batch(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-channel mean and biased variance, one channel at a time, in float64."""
    x = np.asarray(x, dtype=np.float64)
    c = x.shape[1]
    mus, vars_ = np.empty(c), np.empty(c)
    m = None
    for ch in range(c):
        values = x[:, ch].ravel()
        m = values.size
        mu = values.sum() / m
        mus[ch] = mu
        vars_[ch] = ((values - mu) ** 2).sum() / m
    return mus, vars_, int(m)


def brute_algorithm2(batches: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """E[x] = sum m_b mu_b / sum m_b ; Var[x] = sum m_b sigma2_b / sum (m_b - 1)."""
    num_mu = num_var = 0.0
    den_m = den_m1 = 0
    for b in batches:
        mu, var, m = brute_batch(b)
        num_mu = num_mu + m * mu
        num_var = num_var + m * var
        den_m += m
        den_m1 += m - 1
    return num_mu / den_m, num_var / den_m1


def all_values(batches: list[np.ndarray]) -> np.ndarray:
    """(C, total) matrix of every value seen, per channel."""
    c = batches[0].shape[1]
    cols = [np.moveaxis(np.asarray(b, dtype=np.float64), 1, 0).reshape(c, -1) for b in batches]
    return np.concatenate(cols, axis=1)


def accumulate(batches: list[np.ndarray]) -> BnStats:
    s = BnStats(channels=batches[0].shape[1])
    for b in batches:
        update(s, *batch_moments(b))
    return s


def split(x: np.ndarray, size: int) -> list[np.ndarray]:
    return [x[i : i + size] for i in range(0, len(x), size)]


# ---------------------------------------------------------------- batch_moments


def test_batch_moments_spatial_matches_brute_force():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(5, 4, 6, 7)).astype(np.float32)
    mu, var, m = batch_moments(x)
    bmu, bvar, bm = brute_batch(x)
    assert m == bm == 5 * 6 * 7
    assert mu.dtype == np.float64 and var.dtype == np.float64
    np.testing.assert_allclose(mu, bmu, rtol=1e-12)
    np.testing.assert_allclose(var, bvar, rtol=1e-12)


def test_batch_moments_2d_and_3d():
    rng = np.random.default_rng(1)
    x2 = rng.normal(size=(9, 3))
    mu, var, m = batch_moments(x2)
    assert m == 9
    np.testing.assert_allclose(mu, x2.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(var, x2.var(axis=0), rtol=1e-12)
    x3 = rng.normal(size=(2, 3, 11))
    mu, var, m = batch_moments(x3)
    assert m == 22
    np.testing.assert_allclose(var, brute_batch(x3)[1], rtol=1e-12)


def test_batch_moments_rejects_bad_shapes():
    with pytest.raises(ValueError):
        batch_moments(np.zeros(5))
    with pytest.raises(ValueError):
        batch_moments(np.zeros((0, 3)))


# ---------------------------------------------------------------- Algorithm 2


def test_algorithm2_unequal_last_batch_spatial():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(23, 3, 5, 4)) * np.array([1.0, 5.0, 0.1])[None, :, None, None] + np.array(
        [0.0, -7.0, 100.0]
    )[None, :, None, None]
    batches = split(x, 8)  # 8, 8, 7: the last one is short
    assert [len(b) for b in batches] == [8, 8, 7]
    fs = finalize(accumulate(batches), "unbiased", "bn")
    mean, var = brute_algorithm2(batches)
    np.testing.assert_allclose(fs.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(fs.var_unbiased, var, rtol=1e-12)
    np.testing.assert_array_equal(fs.var, fs.var_unbiased)
    assert fs.samples == 23 * 5 * 4
    assert fs.batches == 3
    # the short batch is weighed by its size: the unweighted mean of batch means differs
    unweighted = np.mean([brute_batch(b)[0] for b in batches], axis=0)
    assert not np.allclose(unweighted, mean, rtol=1e-9)


def test_algorithm2_equal_batches_is_m_over_m_minus_1_times_mean_var():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(12, 2, 3, 3))
    batches = split(x, 4)
    m = 4 * 9
    fs = finalize(accumulate(batches), "unbiased", "bn")
    mean_var_b = np.mean([brute_batch(b)[1] for b in batches], axis=0)
    np.testing.assert_allclose(fs.var_unbiased, m / (m - 1) * mean_var_b, rtol=1e-12)
    np.testing.assert_allclose(fs.mean, np.mean([brute_batch(b)[0] for b in batches], axis=0), rtol=1e-12)


def test_large_common_offset_keeps_digits():
    rng = np.random.default_rng(4)
    x = (1e4 + rng.normal(size=(64, 2, 8, 8))).astype(np.float32)
    batches = split(x, 16)
    fs = finalize(accumulate(batches), "unbiased", "bn")
    _, ref_var = brute_algorithm2(batches)  # float64 on the exact float32 values
    rel = np.abs(fs.var_unbiased - ref_var) / ref_var
    assert rel.max() < 1e-6

    # the naive float32 E[x^2] - E[x]^2 loses every digit at this offset
    def naive(b):
        axes = (0, 2, 3)
        return np.mean(b * b, axis=axes, dtype=np.float32) - np.mean(b, axis=axes, dtype=np.float32) ** 2

    m = 16 * 64
    naive_var = sum(m * naive(b).astype(np.float64) for b in batches) / sum(m - 1 for _ in batches)
    naive_rel = np.abs(naive_var - ref_var) / ref_var
    assert naive_rel.max() > 1e-6


# ---------------------------------------------------------------- pooled estimator


def test_pooled_equals_variance_of_all_values():
    rng = np.random.default_rng(5)
    # batch means spread: pooled variance includes the spread between batches
    batches = [rng.normal(loc=i, size=(n, 3, 4)) for i, n in enumerate([5, 5, 2, 7])]
    fs = finalize(accumulate(batches), "pooled", "bn")
    values = all_values(batches)
    np.testing.assert_allclose(fs.var_pooled, values.var(axis=1), rtol=1e-12)
    np.testing.assert_allclose(fs.mean, values.mean(axis=1), rtol=1e-12)
    np.testing.assert_array_equal(fs.var, fs.var_pooled)
    # and it differs from Algorithm 2 here
    assert fs.gap > 0.1


def test_gap_and_estimator_choice_known_values():
    s = BnStats(channels=1)
    update(s, *batch_moments(np.array([[0.0], [2.0]])))  # mu 1, var 1
    update(s, *batch_moments(np.array([[10.0], [12.0]])))  # mu 11, var 1
    u = finalize(s, "unbiased", "bn")
    p = finalize(s, "pooled", "bn")
    np.testing.assert_allclose(u.var_unbiased, [2.0])  # (2*1 + 2*1) / (1 + 1)
    np.testing.assert_allclose(u.var_pooled, [26.0])  # np.var([0, 2, 10, 12])
    np.testing.assert_allclose(u.mean, [6.0])
    assert u.gap == pytest.approx(24.0 / 26.0, rel=1e-12)
    assert p.gap == u.gap
    np.testing.assert_allclose(u.var, [2.0])
    np.testing.assert_allclose(p.var, [26.0])
    with pytest.raises(ValueError, match="estimator"):
        finalize(s, "ema", "bn")


def test_gap_uses_max_over_channels_and_tiny_floor():
    s = BnStats(channels=3)
    # channel 0: constant -> both variances 0 -> gap 0 (no division by zero)
    # channel 1: same batch means -> estimators close; channel 2: spread means -> large gap
    b1 = np.array([[5.0, 0.0, 0.0], [5.0, 2.0, 2.0]])
    b2 = np.array([[5.0, 0.0, 100.0], [5.0, 2.0, 102.0]])
    for b in (b1, b2):
        update(s, *batch_moments(b))
    fs = finalize(s, "unbiased", "bn")
    per = np.abs(fs.var_pooled - fs.var_unbiased) / np.maximum(np.maximum(fs.var_pooled, fs.var_unbiased), 1e-30)
    assert per[0] == 0.0
    assert fs.gap == pytest.approx(per.max())
    assert fs.gap == pytest.approx(per[2])
    assert np.isfinite(fs.gap)


def test_gap_zero_channels():
    s = BnStats(channels=0)
    update(s, *batch_moments(np.zeros((4, 0, 2))))
    fs = finalize(s, "unbiased", "bn")
    assert fs.gap == 0.0 and fs.var.shape == (0,)


# ---------------------------------------------------------------- errors


def test_one_value_per_channel_per_batch_is_a_clear_error():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(6, 4))  # BatchNorm1d input, batch size 1
    s = accumulate(split(x, 1))
    assert s.sum_m1 == 0
    with pytest.raises(BadInputError) as exc:
        finalize(s, "unbiased", "layer1.bn")
    msg = str(exc.value)
    assert "layer1.bn" in msg
    assert "one value per channel per batch" in msg
    assert "batch_size of at least 2" in msg
    assert "\n" not in msg


def test_mixed_m1_batches_are_fine():
    rng = np.random.default_rng(7)
    batches = [rng.normal(size=(1, 3)), rng.normal(size=(4, 3))]
    fs = finalize(accumulate(batches), "unbiased", "bn")
    _, ref = brute_algorithm2(batches)
    np.testing.assert_allclose(fs.var_unbiased, ref, rtol=1e-12)


def test_no_batches_is_an_error():
    with pytest.raises(BadInputError, match="bn7"):
        finalize(BnStats(channels=3), "unbiased", "bn7")


def test_update_validates_and_casts():
    s = BnStats(channels=2)
    update(s, np.array([1.0, 2.0], dtype=np.float32), np.array([0.5, 0.25], dtype=np.float16), 3)
    assert s.sum_mu.dtype == np.float64 and s.pooled_m2.dtype == np.float64
    assert (s.batches, s.sum_m, s.sum_m1) == (1, 3, 2)
    np.testing.assert_allclose(s.sum_mu, [3.0, 6.0])
    np.testing.assert_allclose(s.sum_var, [1.5, 0.75])
    with pytest.raises(ValueError):
        update(s, np.zeros(3), np.zeros(3), 2)
    with pytest.raises(ValueError):
        update(s, np.zeros(2), np.zeros(2), 0)


# ---------------------------------------------------------------- merge


def test_merge_equals_one_accumulator():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(29, 3, 4, 4)) + np.array([0.0, 50.0, -3.0])[None, :, None, None]
    batches = split(x, 6)
    a, b = accumulate(batches[:2]), accumulate(batches[2:])
    a0, b0 = copy.deepcopy(a), copy.deepcopy(b)
    ab = merge(a, b)
    one = accumulate(batches)
    assert (ab.batches, ab.sum_m, ab.sum_m1) == (one.batches, one.sum_m, one.sum_m1)
    for attr in ("sum_mu", "sum_var", "pooled_mean", "pooled_m2"):
        np.testing.assert_allclose(getattr(ab, attr), getattr(one, attr), rtol=1e-12, atol=0)
    fa, fo = finalize(ab, "unbiased", "bn"), finalize(one, "unbiased", "bn")
    np.testing.assert_allclose(fa.var_unbiased, fo.var_unbiased, rtol=1e-12)
    np.testing.assert_allclose(fa.var_pooled, fo.var_pooled, rtol=1e-12)
    # inputs untouched
    for attr in ("batches", "sum_m", "sum_m1"):
        assert getattr(a, attr) == getattr(a0, attr) and getattr(b, attr) == getattr(b0, attr)
    for attr in ("sum_mu", "sum_var", "pooled_mean", "pooled_m2"):
        np.testing.assert_array_equal(getattr(a, attr), getattr(a0, attr))
        np.testing.assert_array_equal(getattr(b, attr), getattr(b0, attr))


def test_merge_with_empty_and_channel_mismatch():
    rng = np.random.default_rng(9)
    a = accumulate(split(rng.normal(size=(10, 2)), 3))
    for m in (merge(a, BnStats(channels=2)), merge(BnStats(channels=2), a)):
        np.testing.assert_allclose(m.pooled_m2, a.pooled_m2, rtol=1e-15)
        np.testing.assert_allclose(m.pooled_mean, a.pooled_mean, rtol=1e-15)
        assert m.sum_m == a.sum_m
    with pytest.raises(ValueError):
        merge(a, BnStats(channels=3))


# ---------------------------------------------------------------- property: partition independence

_DATA = np.random.default_rng(10).normal(loc=[[2.0], [-40.0]], scale=[[1.0], [3.0]], size=(2, 40)).T.copy()  # (40, 2)


@settings(max_examples=60, deadline=None)
@given(
    cuts=st.lists(st.integers(min_value=1, max_value=39), max_size=12, unique=True),
    split_at=st.integers(min_value=0, max_value=12),
)
def test_pooled_independent_of_partition(cuts, split_at):
    edges = [0, *sorted(cuts), len(_DATA)]
    batches = [_DATA[a:b] for a, b in zip(edges, edges[1:])]
    s = accumulate(batches)
    assert s.sum_m == len(_DATA) and s.batches == len(batches)
    k = min(split_at, len(batches))
    left = accumulate(batches[:k]) if k else BnStats(channels=2)
    right = accumulate(batches[k:]) if k < len(batches) else BnStats(channels=2)
    merged = merge(left, right)
    ref_var = _DATA.var(axis=0)
    ref_mean = _DATA.mean(axis=0)
    for acc in (s, merged):
        np.testing.assert_allclose(acc.pooled_m2 / acc.sum_m, ref_var, rtol=1e-10)
        np.testing.assert_allclose(acc.pooled_mean, ref_mean, rtol=1e-10)
        np.testing.assert_allclose(acc.sum_mu / acc.sum_m, ref_mean, rtol=1e-10)
    if s.sum_m1:
        fs = finalize(s, "pooled", "bn")
        np.testing.assert_allclose(fs.var, ref_var, rtol=1e-10)
        _, ref_unb = brute_algorithm2(batches)
        np.testing.assert_allclose(fs.var_unbiased, ref_unb, rtol=1e-10)
