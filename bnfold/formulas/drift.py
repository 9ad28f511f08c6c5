"""Drift of a BN's stored statistics from the data's (pure float64 math; no onnx, no torch).

Per channel c, with the data's Algorithm 2 estimates mu_data, var_data (docs/math.md section 2)
and the BN's epsilon:

    mean shift   d_c = |mu_stored - mu_data| / sqrt(var_data + eps)
    var ratio    r_c = |ln((var_stored + eps) / (var_data + eps))|

Both are what the BN itself sees: it divides by sqrt(var + eps), so ``d_c`` is the offset the
stale mean puts on the normalised output (in units of that output's spread), and ``exp(r_c / 2)``
the factor by which a stale variance scales it. Adding eps keeps a dead channel (variance 0)
finite; where var >> eps it changes nothing. The record keeps the maxima over channels and the
channel with the larger of its two figures.
"""
from __future__ import annotations

import math

import numpy as np

from bnfold.records import Drift

__all__ = ["MEAN_SHIFT_FLAG", "LOG_VAR_RATIO_FLAG", "drift", "flagged", "no_drift"]

#: flag thresholds of the text table (README, "Drift of stored statistics"): a mean 0.1 sigma off,
#: or a spread more than ~10% off (exp(0.2 / 2) = 1.105)
MEAN_SHIFT_FLAG = 0.1
LOG_VAR_RATIO_FLAG = 0.2


def drift(stored_mean: np.ndarray, stored_var: np.ndarray, data_mean: np.ndarray, data_var: np.ndarray,
          eps: float) -> Drift:
    """The drift record of one BN (all arrays per channel, any float dtype; computed in float64)."""
    mu_s = np.asarray(stored_mean, dtype=np.float64).reshape(-1)
    var_s = np.asarray(stored_var, dtype=np.float64).reshape(-1)
    mu_d = np.asarray(data_mean, dtype=np.float64).reshape(-1)
    var_d = np.asarray(data_var, dtype=np.float64).reshape(-1)
    if not (mu_s.shape == var_s.shape == mu_d.shape == var_d.shape) or mu_s.size == 0:
        return no_drift(f"stored statistics have {mu_s.size} channels, the data {mu_d.size}")
    eps = float(eps)
    with np.errstate(divide="ignore", invalid="ignore"):
        shift = np.abs(mu_s - mu_d) / np.sqrt(var_d + eps)
        ratio = np.abs(np.log((var_s + eps) / (var_d + eps)))
    # a channel whose figure is not finite (zero denominators with eps=0, corrupt statistics) is the worst
    shift = np.where(np.isnan(shift), np.inf, shift)
    ratio = np.where(np.isnan(ratio), np.inf, ratio)
    worst = int(np.argmax(np.maximum(shift, ratio)))
    return Drift(mean_shift_sigma_max=float(shift.max()), log_var_ratio_max=float(ratio.max()),
                 worst_channel=worst)


def no_drift(note: str) -> Drift:
    """A record without figures, saying why (e.g. a training-mode BN has no stored statistics)."""
    return Drift(mean_shift_sigma_max=None, log_var_ratio_max=None, worst_channel=None, note=note)


def flagged(d: Drift | None) -> bool:
    """True where a figure is over its documented threshold (or not finite)."""
    if d is None:
        return False
    return any(v is not None and not (math.isfinite(v) and v <= limit)
               for v, limit in ((d.mean_shift_sigma_max, MEAN_SHIFT_FLAG), (d.log_var_ratio_max, LOG_VAR_RATIO_FLAG)))
