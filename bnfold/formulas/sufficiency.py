"""How much calibration data is enough (docs/math.md section 2.2). Pure numpy, float64.

From the batch-to-batch spread of the k batch estimates of one BN (kept in
:class:`bnfold.records.BnStats` as running weighted (weight, mean, M2) triples), per channel::

    tau2     = sum_b m_b (mu_b - E)^2 / (k - 1)            SE(E)  = sqrt(tau2 / M) / sqrt(V)
    rho2     = sum_b (m_b - 1)(v_b - V)^2 / (k_v - 1)      RSE(V) = sqrt(rho2 / sum (m_b - 1)) / V

with M = sum m_b, v_b = m_b sigma2_b / (m_b - 1) the unbiased batch variance and E, V Algorithm
2's weighted estimates. The worst channel is the one with the larger of the two figures; the
samples that bring it to the target scale as 1/sqrt(n): ``ceil(samples * (worst / target)^2)``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from bnfold.errors import BadInputError
from bnfold.records import BnStats, FrozenStats, Sufficiency

__all__ = ["DEFAULT_TARGET_SE", "MIN_TARGET_SE", "approx_samples", "channel_errors", "check_target_se", "missed",
           "percent", "samples_for_target", "summary_line", "sufficiency", "sufficiency_warning", "worst_figure"]

DEFAULT_TARGET_SE = 0.01  # 1 %: the worst channel's SE(E)/sigma and RSE(V)
# The smallest target accepted: the frozen statistics are stored as float32 (relative round-off
# 6e-8), so a target below 1e-6 cannot be told from round-off, and (worst / target)^2 overflows
# float64 near 1e-154 and below (an internal OverflowError before this floor existed).
MIN_TARGET_SE = 1e-6

# A channel whose variance estimate is within float64 round-off of its mean (or under 1e-30
# absolute) is constant in the data: it has no sigma to measure E's error in, and its statistics
# are exact as seen. Such channels are left out of the worst-channel search.
_CONSTANT_REL = 1e-12
_CONSTANT_ABS = 1e-30


def check_target_se(target_se: float) -> float:
    """``target_se`` as a float, or :class:`BadInputError` naming the fix."""
    try:
        t = float(target_se)
    except (TypeError, ValueError):
        t = math.nan
    if not math.isfinite(t) or t <= 0.0:
        raise BadInputError(f"target_se must be a positive number, got {target_se!r}; pass e.g. target_se=0.01 "
                            "(1 %)")
    if t < MIN_TARGET_SE:
        raise BadInputError(f"target_se={target_se!r} is below {MIN_TARGET_SE:g}, finer than the float32 statistics "
                            f"can hold; pass a target of at least {MIN_TARGET_SE:g}, e.g. target_se=0.01 (1 %)")
    return t


def channel_errors(stats: BnStats) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per channel: ``(mean_se_sigma, var_rse, live)``. ``live`` marks the channels with a
    non-zero variance (the others have NaN figures). Needs ``stats.batches >= 2`` and
    ``stats.var_batches >= 2``."""
    k, k_v = stats.batches, stats.var_batches
    if k < 2 or k_v < 2:
        raise ValueError(f"the batch-to-batch spread needs at least two batches, got {min(k, k_v)}")
    e = np.asarray(stats.pooled_mean, dtype=np.float64)
    v = np.asarray(stats.var_mean, dtype=np.float64)
    live = v > np.maximum(np.square(_CONSTANT_REL * e), _CONSTANT_ABS)
    safe_v = np.where(live, v, 1.0)
    tau2 = np.asarray(stats.mu_m2, dtype=np.float64) / (k - 1)
    rho2 = np.asarray(stats.var_m2, dtype=np.float64) / (k_v - 1)
    mean_se = np.sqrt(tau2 / stats.sum_m) / np.sqrt(safe_v)
    var_rse = np.sqrt(rho2 / stats.sum_m1) / safe_v
    return np.where(live, mean_se, np.nan), np.where(live, var_rse, np.nan), live


def samples_for_target(samples: int, worst: float, target: float) -> int:
    """Samples that bring ``worst`` (seen on ``samples``) to ``target``, scaling as 1/sqrt(n)."""
    return int(math.ceil(samples * (worst / target) ** 2))


def sufficiency(stats: BnStats, target: float = DEFAULT_TARGET_SE) -> Sufficiency:
    """The :class:`Sufficiency` of one BN's accumulated statistics against ``target``."""
    target = check_target_se(target)
    k = stats.batches

    def none(reason: str) -> Sufficiency:
        return Sufficiency(k, stats.samples, target, None, None, None, None, reason)

    if k < 2:
        return none(f"{k} calibration batch: the standard errors need the spread of at least 2 batch "
                    "estimates; give more data or a smaller batch size")
    if stats.var_batches < 2:
        return none(f"{stats.var_batches} batch with more than one value per channel: the variance's standard "
                    "error needs at least 2; use a batch size of at least 2")
    mean_se, var_rse, live = channel_errors(stats)
    if not live.any():
        return none("every channel is constant in the data (zero variance): its statistics are exact as seen")
    worst_each = np.where(live, np.fmax(mean_se, var_rse), -np.inf)
    c = int(np.argmax(worst_each))
    worst = float(worst_each[c])
    return Sufficiency(
        batches=k,
        samples=stats.samples,
        target=target,
        mean_se_sigma_max=float(np.nanmax(mean_se)),
        var_rse_max=float(np.nanmax(var_rse)),
        worst_channel=c,
        samples_for_target=samples_for_target(stats.samples, worst, target) if stats.samples else None,
        reason="",
    )


def approx_samples(n: int) -> str:
    """``n`` rounded up to two significant figures, thousands grouped: 2 271 -> ``"2 300"``."""
    digits = len(str(max(int(n), 1)))
    step = 10 ** max(digits - 2, 0)
    return f"{-(-int(n) // step) * step:,}".replace(",", " ")


def need_spread(batches: int) -> float:
    """The relative uncertainty of ``samples_for_target`` estimated from ``batches`` batches: a
    standard error taken from the spread of k estimates is good to about 1/sqrt(2(k-1)) of itself,
    and the samples needed go as its square, so about sqrt(2/(k-1)) (0.82 at k = 4, 0.33 at 20)."""
    return math.sqrt(2.0 / (batches - 1)) if batches > 1 else math.inf


def _need_note(s: Sufficiency) -> str:
    return f" (from {s.batches} batches: +-{need_spread(s.batches):.0%})" if s.samples_for_target else ""


def percent(x: float) -> str:
    """A fraction as a percentage with two significant figures: 0.0123 -> ``"1.2 %"``."""
    return f"{x * 100:.2g} %"


def missed(stats: Mapping[str, FrozenStats]) -> list[tuple[str, Sufficiency]]:
    """The BNs whose worst figure misses its target, the one that needs the most samples first."""
    out = [(n, s.sufficiency) for n, s in stats.items() if s.sufficiency is not None and s.sufficiency.met is False]
    return sorted(out, key=lambda ns: -(ns[1].samples_for_target or 0))


def sufficiency_warning(stats: Mapping[str, FrozenStats]) -> str | None:
    """The warning for BNs whose statistics miss the target (None when every one meets it)."""
    bad = missed(stats)
    if not bad:
        return None
    name, s = bad[0]
    worst = worst_figure(s)
    need = f"~{approx_samples(s.samples_for_target)} samples" if s.samples_for_target else "more samples"
    return (f"calibration statistics miss the {percent(s.target)} standard-error target at {len(bad)} BN "
            f"(worst: '{name}', {percent(worst)} at channel {s.worst_channel} after {s.samples} samples): "
            f"give {need}{_need_note(s)}, or set the target with target_se=")


def worst_figure(s: Sufficiency) -> float:
    """The larger of the two figures (0.0 where there are none)."""
    return max(s.mean_se_sigma_max or 0.0, s.var_rse_max or 0.0)


def summary_line(named: Sequence[tuple[str, Sufficiency]]) -> str | None:
    """One line for the text summary: the target, the samples seen and, where missed, the BN that
    needs the most samples ("50 of 53 BN within 1 % after 640 samples; /layer4/BN needs ~2 300").
    None without BNs."""
    if not named:
        return None
    rated = [(n, s) for n, s in named if s.met is not None]
    if not rated:
        return f"Sufficiency: not estimated ({named[0][1].reason})"
    target = percent(rated[0][1].target)
    seen = max(s.samples for _, s in rated)
    bad = [(n, s) for n, s in rated if s.met is False]
    skipped = f" ({len(named) - len(rated)} BN not estimated)" if len(rated) < len(named) else ""
    if not bad:
        name, s = max(rated, key=lambda ns: worst_figure(ns[1]))
        return (f"Sufficiency: statistics within {target} after {seen} samples (worst: {name}, "
                f"{percent(worst_figure(s))}){skipped}")
    name, s = max(bad, key=lambda ns: ns[1].samples_for_target or 0)
    need = approx_samples(s.samples_for_target) if s.samples_for_target else "more"
    return (f"Sufficiency: {len(rated) - len(bad)} of {len(rated)} BN within {target} after {seen} samples; "
            f"{name} needs ~{need}{_need_note(s)}{skipped}")
