"""The sufficiency formulas (docs/math.md 2.2) against an independent numpy computation, and the
merge of per-rank partials against one sequential pass."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from bnfold.errors import BadInputError
from bnfold.formulas.stats import batch_moments, finalize, merge, update
from bnfold.formulas.sufficiency import channel_errors, sufficiency
from bnfold.records import BnStats


def _accumulate(batches: list[np.ndarray]) -> BnStats:
    st = BnStats(channels=batches[0].shape[1])
    for x in batches:
        mu, var, m = batch_moments(x)
        update(st, mu, var, m, n_b=x.shape[0])
    return st


def _reference(batches: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The formulas written out directly from the per-batch estimates (no running triples)."""
    mus, s2s, ms = [], [], []
    for x in batches:
        flat = np.moveaxis(x.astype(np.float64), 1, 0).reshape(x.shape[1], -1)
        mus.append(flat.mean(axis=1))
        s2s.append(flat.var(axis=1))  # biased
        ms.append(flat.shape[1])
    mu, s2, m = np.array(mus), np.array(s2s), np.array(ms, dtype=np.float64)[:, None]
    k = len(batches)
    big_m = m.sum()
    e = (m * mu).sum(axis=0) / big_m
    v = (m * s2).sum(axis=0) / (m - 1).sum()
    tau2 = (m * (mu - e) ** 2).sum(axis=0) / (k - 1)
    v_b = m * s2 / (m - 1)
    rho2 = ((m - 1) * (v_b - v) ** 2).sum(axis=0) / (k - 1)
    return np.sqrt(tau2 / big_m) / np.sqrt(v), np.sqrt(rho2 / (m - 1).sum()) / v


def _data(seed: int, sizes: list[int], c: int = 5, hw: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # per-batch offsets: batch-correlated data, so the spread is not the within-batch one
    return [(rng.normal(size=(n, c, hw, hw)) * (1 + np.arange(c))[None, :, None, None]
             + rng.normal(size=(1, c, 1, 1)) * 0.3 + 10.0) for n in sizes]


# float64 running updates vs direct sums over <= 10 batches: both are O(k) float64 operations on
# values of order 10, so they agree to ~1e-13 relative; 1e-10 leaves room without hiding a wrong
# weight (a wrong formula differs by >= 1e-3 here)
RTOL = 1e-10


@pytest.mark.parametrize("sizes", [[4, 4, 4, 4], [5, 3, 8, 2, 6], [8, 8, 8, 8, 8, 3]],
                         ids=["equal", "unequal", "short-last"])
def test_channel_errors_match_numpy(sizes: list[int]) -> None:
    batches = _data(1, sizes)
    mean_se, var_rse, live = channel_errors(_accumulate(batches))
    ref_mean, ref_var = _reference(batches)
    assert live.all()
    np.testing.assert_allclose(mean_se, ref_mean, rtol=RTOL)
    np.testing.assert_allclose(var_rse, ref_var, rtol=RTOL)


def test_equal_batches_reduce_to_s_over_sqrt_k() -> None:
    """With equal batches, SE(E) is the sample standard deviation of the batch means over sqrt(k)."""
    batches = _data(2, [6] * 7)
    st = _accumulate(batches)
    mean_se, _, _ = channel_errors(st)
    mus = np.array([batch_moments(x)[0] for x in batches])
    v = finalize(st, "unbiased", "bn").var_unbiased
    expect = mus.std(axis=0, ddof=1) / math.sqrt(len(batches)) / np.sqrt(v)
    np.testing.assert_allclose(mean_se, expect, rtol=RTOL)


def test_record_worst_channel_and_samples_for_target() -> None:
    sizes = [5, 3, 8, 2, 6]
    batches = _data(3, sizes)
    suff = sufficiency(_accumulate(batches), 0.01)
    ref_mean, ref_var = _reference(batches)
    worst = np.maximum(ref_mean, ref_var)
    assert suff.batches == 5 and suff.samples == sum(sizes)
    assert suff.worst_channel == int(np.argmax(worst))
    assert suff.mean_se_sigma_max == pytest.approx(ref_mean.max(), rel=RTOL)
    assert suff.var_rse_max == pytest.approx(ref_var.max(), rel=RTOL)
    assert suff.samples_for_target == math.ceil(sum(sizes) * (worst.max() / 0.01) ** 2)
    assert suff.met is False
    loose = sufficiency(_accumulate(batches), 10.0)
    assert loose.met is True and loose.samples_for_target is not None and loose.samples_for_target < sum(sizes)


def test_one_batch_is_null_with_reason() -> None:
    suff = sufficiency(_accumulate(_data(4, [16])))
    assert suff.batches == 1 and suff.samples == 16
    assert suff.mean_se_sigma_max is None and suff.var_rse_max is None
    assert suff.worst_channel is None and suff.samples_for_target is None and suff.met is None
    assert "at least 2 batch" in suff.reason


def test_constant_channel_is_left_out() -> None:
    """A zero-variance channel has no sigma: its statistics are exact as seen, and it is not the
    worst channel even though its batch means differ (which would be an infinite SE in sigma units)."""
    batches = _data(5, [4, 4, 4])
    for j, x in enumerate(batches):
        x[:, 2] = float(j)  # constant within each batch
    st = _accumulate(batches)
    mean_se, var_rse, live = channel_errors(st)
    assert live.tolist() == [True, True, False, True, True]
    assert np.isnan(mean_se[2]) and np.isnan(var_rse[2])
    suff = sufficiency(st)
    assert suff.worst_channel != 2 and suff.mean_se_sigma_max is not None and math.isfinite(suff.mean_se_sigma_max)
    for x in batches:
        x[:] = 7.0
    dead = sufficiency(_accumulate(batches))
    assert dead.mean_se_sigma_max is None and "constant" in dead.reason


def test_bad_target_refused() -> None:
    st = _accumulate(_data(6, [4, 4]))
    for bad in (0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(BadInputError, match="target_se must be a positive number"):
            sufficiency(st, bad)


def _fields_close(a: BnStats, b: BnStats) -> None:
    for f in dataclasses.fields(BnStats):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray):
            # Chan's merge vs one running pass: the same float64 sums in another order, ~1e-14
            # relative; 1e-11 is far from any wrong weight (>= 1e-2 here)
            np.testing.assert_allclose(x, y, rtol=1e-11, atol=1e-9, err_msg=f.name)
        else:
            assert x == y, f.name


@pytest.mark.parametrize("ranks", [2, 3, 5])
def test_merge_of_partials_equals_sequential(ranks: int) -> None:
    """Batch j to rank j mod N (engineer D's sharding), partials merged in rank order 0..N-1."""
    batches = _data(7, [6, 6, 6, 6, 6, 6, 6, 4, 1, 3])
    seq = _accumulate(batches)
    parts = [BnStats(channels=5) for _ in range(ranks)]
    for j, x in enumerate(batches):
        mu, var, m = batch_moments(x)
        update(parts[j % ranks], mu, var, m, n_b=x.shape[0])
    merged = parts[0]
    for p in parts[1:]:
        merged = merge(merged, p)
    _fields_close(merged, seq)
    assert merged.var_batches == 10 and merged.samples == 50
    s_seq, s_merged = sufficiency(seq), sufficiency(merged)
    assert s_merged.worst_channel == s_seq.worst_channel
    assert s_merged.samples_for_target == s_seq.samples_for_target


def test_merge_with_empty_partial_is_identity() -> None:
    """A rank that got no batch (more ranks than batches) contributes nothing."""
    st = _accumulate(_data(8, [4, 4, 4]))
    _fields_close(merge(st, BnStats(channels=5)), st)
    _fields_close(merge(BnStats(channels=5), st), st)


def test_single_value_batches_carry_no_variance_weight() -> None:
    """A batch with m_b = 1 (one sample, no spatial axes) has no unbiased variance: it counts in
    the mean's spread, not in the variance's."""
    rng = np.random.default_rng(9)
    batches = [rng.normal(size=(n, 3)) for n in (4, 1, 4, 4)]
    st = _accumulate(batches)
    assert st.batches == 4 and st.var_batches == 3
    assert np.isfinite(channel_errors(st)[1]).all()


def test_the_samples_needed_carry_the_spread_of_their_estimate() -> None:
    # simulated: a standard error from the spread of k normal estimates, squared (samples scale as
    # SE^2), has a relative standard deviation near sqrt(2 / (k - 1))
    from bnfold.formulas.sufficiency import need_spread

    rng = np.random.default_rng(0)
    for k in (4, 8, 20):
        se2 = rng.standard_normal((20000, k)).var(axis=1, ddof=1)
        assert abs(se2.std() / se2.mean() - need_spread(k)) < 0.05 * need_spread(k)
    assert need_spread(1) == float("inf")
