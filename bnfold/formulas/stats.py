"""Population statistics for a BatchNorm from calibration batches (docs/math.md section 2).

Pure numpy, float64 throughout. Two estimators come out of the same pass:

* **Algorithm 2** of the BN paper (the default, ``"unbiased"``), in its weighted form so a
  short last batch counts by its size::

      E[x]   = sum_b m_b * mu_b / sum_b m_b
      Var[x] = sum_b m_b * sigma2_b / sum_b (m_b - 1)

* the **pooled** estimator (``"pooled"``): the mean and the population variance of every value
  seen, kept as a running (count, mean, M2) merged with Chan's parallel formula.

``mu_b``/``sigma2_b`` are the per-channel (axis 1) mean and *biased* variance of batch b, computed
by :func:`batch_moments` with a two-pass formula in float64 (never ``E[x^2] - E[x]^2``).
All state lives in :class:`bnfold.records.BnStats`; partial results (ranks, shards) combine with
:func:`merge`, exactly by addition for Algorithm 2's sums.
"""
from __future__ import annotations

import numpy as np

from bnfold.errors import BadInputError
from bnfold.formulas.sufficiency import DEFAULT_TARGET_SE, sufficiency
from bnfold.records import BnStats, FrozenStats

__all__ = ["ESTIMATORS", "batch_moments", "finalize", "merge", "update"]

ESTIMATORS = ("unbiased", "pooled")
GAP_WARNING = 0.10  # warn where the unbiased and pooled variances differ by more than 10 %


def gap_warning(frozen: dict[str, FrozenStats]) -> str | None:
    """The warning naming the BNs (the ten widest) whose estimators differ by more than GAP_WARNING."""
    wide = sorted((s.gap, n) for n, s in frozen.items() if s.gap > GAP_WARNING)
    if not wide:
        return None
    names = ", ".join(f"{n} ({g:.0%})" for g, n in reversed(wide[-10:]))
    return (f"unbiased (Algorithm 2) and pooled variance differ by more than {GAP_WARNING:.0%} at "
            f"{len(wide)} BN: {names}{' ...' if len(wide) > 10 else ''}")

_TINY = 1e-30


def batch_moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-channel (axis 1) mean and biased variance of one mini-batch.

    ``x`` has shape ``(N, C, *spatial)`` or ``(N, C)``. Both moments are computed in float64 with
    two passes (the mean first, then the mean of squared deviations), so a large common offset
    such as ``1e4 + N(0, 1)`` in float32 keeps its digits.

    Returns ``(mu, var, m)``: two float64 arrays of shape ``(C,)`` and ``m = N * prod(spatial)``,
    the number of values per channel.
    """
    x = np.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"batch_moments needs an array of shape (N, C, ...), got shape {x.shape}")
    m = int(x.shape[0]) * int(np.prod(x.shape[2:], dtype=np.int64))
    if m < 1:
        raise ValueError(f"batch_moments got an empty batch of shape {x.shape}")
    x64 = x.astype(np.float64, copy=False)
    axes = (0,) + tuple(range(2, x.ndim))
    mu = x64.mean(axis=axes)
    shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    dev = x64 - mu.reshape(shape)
    var = np.square(dev, out=dev).mean(axis=axes)
    return mu, var, m


def _as_channels(a: np.ndarray, channels: int, what: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.shape != (channels,):
        raise ValueError(f"{what} has shape {a.shape}, expected ({channels},)")
    return a


def update(stats: BnStats, mu_b: np.ndarray, var_b: np.ndarray, m_b: int, *, n_b: int = 0) -> None:
    """Add one batch's moments to ``stats`` in place.

    ``mu_b`` and ``var_b`` are the batch's per-channel mean and *biased* variance (shape ``(C,)``,
    any float dtype; used as float64), ``m_b`` the number of values per channel in the batch and
    ``n_b`` its samples (leading-axis items; 0 where unknown). Algorithm 2's sums grow by
    addition; the pooled ``(count, mean, M2)`` and the batch-to-batch spread's two weighted
    triples (docs/math.md section 2.2) merge with Chan's parallel formula.
    """
    m_b = int(m_b)
    if m_b < 1:
        raise ValueError(f"update needs m_b >= 1, got {m_b}")
    mu_b = _as_channels(mu_b, stats.channels, "mu_b")
    var_b = _as_channels(var_b, stats.channels, "var_b")

    n_a, w_a = stats.sum_m, stats.sum_m1
    stats.batches += 1
    stats.samples += int(n_b)
    stats.sum_m += m_b
    stats.sum_m1 += m_b - 1
    stats.sum_mu = stats.sum_mu + m_b * mu_b
    stats.sum_var = stats.sum_var + m_b * var_b

    n = n_a + m_b
    delta = mu_b - stats.pooled_mean
    between = np.square(delta) * (n_a * m_b / n)
    stats.pooled_mean = stats.pooled_mean + delta * (m_b / n)
    stats.pooled_m2 = stats.pooled_m2 + m_b * var_b + between
    stats.mu_m2 = stats.mu_m2 + between

    w_b = m_b - 1  # the unbiased batch variance's weight; a batch of m_b = 1 has none
    if w_b:
        w = w_a + w_b
        d_v = var_b * (m_b / w_b) - stats.var_mean
        stats.var_batches += 1
        stats.var_mean = stats.var_mean + d_v * (w_b / w)
        stats.var_m2 = stats.var_m2 + np.square(d_v) * (w_a * w_b / w)


def _chan(w_a: int, mean_a: np.ndarray, m2_a: np.ndarray, w_b: int, mean_b: np.ndarray, m2_b: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray]:
    """Chan's parallel formula: the (mean, M2) of two weighted (weight, mean, M2) triples."""
    ma, mb = np.asarray(mean_a, dtype=np.float64), np.asarray(mean_b, dtype=np.float64)
    w = w_a + w_b
    if w == 0:
        return np.zeros_like(ma), np.zeros_like(ma)
    delta = mb - ma
    return (ma + delta * (w_b / w),
            np.asarray(m2_a, dtype=np.float64) + np.asarray(m2_b, dtype=np.float64)
            + np.square(delta) * (w_a * w_b / w))


def merge(a: BnStats, b: BnStats) -> BnStats:
    """Combine two partial results (two ranks, two shards) into a new :class:`BnStats`.

    Algorithm 2's sums add; the pooled parts and the batch-to-batch spread's triples merge with
    Chan's formula. Inputs are not modified. Merging per-rank partials in rank order equals one
    sequential pass to float64 round-off (tests/test_sufficiency_merge.py).
    """
    if a.channels != b.channels:
        raise ValueError(f"cannot merge statistics of {a.channels} and {b.channels} channels")
    n_a, n_b = a.sum_m, b.sum_m
    mean, m2 = _chan(n_a, a.pooled_mean, a.pooled_m2, n_b, b.pooled_mean, b.pooled_m2)
    _, mu_m2 = _chan(n_a, a.pooled_mean, a.mu_m2, n_b, b.pooled_mean, b.mu_m2)
    var_mean, var_m2 = _chan(a.sum_m1, a.var_mean, a.var_m2, b.sum_m1, b.var_mean, b.var_m2)
    return BnStats(
        channels=a.channels,
        batches=a.batches + b.batches,
        sum_m=n_a + n_b,
        sum_m1=a.sum_m1 + b.sum_m1,
        sum_mu=np.asarray(a.sum_mu, dtype=np.float64) + np.asarray(b.sum_mu, dtype=np.float64),
        sum_var=np.asarray(a.sum_var, dtype=np.float64) + np.asarray(b.sum_var, dtype=np.float64),
        pooled_mean=mean,
        pooled_m2=m2,
        samples=a.samples + b.samples,
        var_batches=a.var_batches + b.var_batches,
        mu_m2=mu_m2,
        var_mean=var_mean,
        var_m2=var_m2,
    )


def estimator_gap(var_pooled: np.ndarray, var_unbiased: np.ndarray) -> float:
    """Max over channels of ``|pooled - unbiased| / max(pooled, unbiased, 1e-30)``; 0.0 for C == 0."""
    p = np.asarray(var_pooled, dtype=np.float64)
    u = np.asarray(var_unbiased, dtype=np.float64)
    if p.size == 0:
        return 0.0
    denom = np.maximum(np.maximum(p, u), _TINY)
    return float(np.max(np.abs(p - u) / denom))


def finalize(stats: BnStats, estimator: str, bn_name: str, target_se: float = DEFAULT_TARGET_SE) -> FrozenStats:
    """The frozen statistics of one BN from its accumulated sums.

    ``mean = sum_mu / sum_m``; ``var_unbiased = sum_var / sum_m1`` (Algorithm 2, weighted form);
    ``var_pooled = pooled_m2 / sum_m`` (population variance of all values seen). ``estimator``
    (``"unbiased"`` or ``"pooled"``) picks which one goes into ``var``; ``gap`` compares them;
    ``sufficiency`` says how far the data is from ``target_se`` (``bnfold.formulas.sufficiency``).

    Raises :class:`BadInputError` when no batch was seen, or when every batch had one value per
    channel (``m_b == 1``: no unbiased estimate exists); ``ValueError`` for an unknown estimator.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {', '.join(ESTIMATORS)}")
    if stats.batches == 0 or stats.sum_m == 0:
        raise BadInputError(
            f"BN '{bn_name}' saw no calibration batch; give calibration data with at least one sample"
        )
    if stats.sum_m1 == 0:
        raise BadInputError(
            f"BN '{bn_name}' has no unbiased variance estimate with one value per channel per batch "
            f"({stats.batches} batch(es) of m=1); use a batch_size of at least 2"
        )
    sum_m = float(stats.sum_m)
    mean = np.asarray(stats.sum_mu, dtype=np.float64) / sum_m
    var_unbiased = np.asarray(stats.sum_var, dtype=np.float64) / float(stats.sum_m1)
    var_pooled = np.asarray(stats.pooled_m2, dtype=np.float64) / sum_m
    var = var_unbiased if estimator == "unbiased" else var_pooled
    return FrozenStats(
        mean=mean,
        var=var.copy(),
        var_unbiased=var_unbiased,
        var_pooled=var_pooled,
        gap=estimator_gap(var_pooled, var_unbiased),
        samples=int(stats.sum_m),
        batches=int(stats.batches),
        sufficiency=sufficiency(stats, target_se),
    )
