"""Many folds at once: ``arith``'s formulas, vectorised over small tensors.

A network of thousands of small BNs would otherwise pay numpy's per-call cost (a few
microseconds) a dozen times per BN. Here the per-channel vectors of all BNs, and the weights of
all small Convs, are concatenated, computed in one pass and split again. Every element goes
through exactly the float64 operations ``arith`` applies to it, so the results are bit for bit
those of the one-at-a-time functions (tested). Anything unusual (a shape ``arith`` would refuse,
a value the dtype cannot hold, a large weight) is handed to ``arith`` one at a time, which raises
or computes exactly as before.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np

from bnfold.formulas import arith

# weights up to this many elements are batched; one batch holds at most about this many
BATCH_ELEMENTS = 1 << 18


@dataclass(frozen=True)
class BnParams:
    gamma: np.ndarray
    beta: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    eps: float


def bounds(lengths: list[int]) -> list[tuple[int, int]]:
    """(start, stop) of consecutive pieces of the given lengths (np.split costs far more per piece)."""
    out, start = [], 0
    for n in lengths:
        out.append((start, start + n))
        start += n
    return out


def _vector_ok(p: BnParams) -> bool:
    m = p.mean
    if m.ndim != 1:
        return False
    shape = m.shape
    return all(a is not None and a.shape == shape for a in (p.gamma, p.beta, p.var))


def scale_shift_flat(gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray,
                     eps: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``bn_scale_shift`` over concatenated per-channel vectors (``eps`` repeated per channel);
    None where some ``var + eps`` is not positive and finite (``arith`` then names the channel)."""
    f64 = np.float64
    denom = np.asarray(var, dtype=f64) + eps
    if not (np.isfinite(denom) & (denom > 0)).all():
        return None
    s = np.asarray(gamma, dtype=f64) / np.sqrt(denom)
    return s, np.asarray(beta, dtype=f64) - s * np.asarray(mean, dtype=f64)


def scale_shift_many(params: Sequence[BnParams]) -> list[tuple[np.ndarray, np.ndarray]]:
    """``arith.bn_scale_shift`` of every entry (raises as it does for a bad one)."""
    if not params or not all(_vector_ok(p) for p in params):
        return [arith.bn_scale_shift(p.gamma, p.beta, p.mean, p.var, p.eps) for p in params]
    lengths = [p.mean.shape[0] for p in params]
    f64 = np.float64
    st = scale_shift_flat(np.concatenate([p.gamma for p in params], dtype=f64),
                          np.concatenate([p.beta for p in params], dtype=f64),
                          np.concatenate([p.mean for p in params], dtype=f64),
                          np.concatenate([p.var for p in params], dtype=f64),
                          np.repeat(np.array([float(p.eps) for p in params]), lengths))
    if st is None:  # arith names the BN and channel
        return [arith.bn_scale_shift(p.gamma, p.beta, p.mean, p.var, p.eps) for p in params]
    s, t = st
    return [(s[a:b], t[a:b]) for a, b in bounds(lengths)]


@dataclass(frozen=True)
class ConvFold:
    """One backward fold into a Conv weight ``(C_out, ...)`` (scaled along axis 0)."""

    weight: np.ndarray
    bias: np.ndarray | None
    s: np.ndarray  # float64 (C_out,)
    t: np.ndarray


# a folded (weight, bias), or the error saying which value the dtype cannot hold
Folded: TypeAlias = tuple[np.ndarray, np.ndarray] | arith.FoldValueError


def _bias_original(b: np.ndarray | None, c: int) -> np.ndarray:
    return np.zeros(c) if b is None else b


def fold_conv_one(job: ConvFold) -> Folded:
    """``arith.fold_conv`` then ``cast_back`` of weight and bias; a FoldValueError is returned."""
    try:
        return arith.fold_conv_cast(job.weight, job.bias, job.s, job.t)
    except arith.FoldValueError as exc:
        return exc


def _batchable(job: ConvFold) -> bool:
    w, b = job.weight, job.bias
    if w.ndim < 3 or w.size > BATCH_ELEMENTS // 4 or w.dtype not in arith._LIMITS:
        return False
    c = w.shape[0]
    if not c or job.s.shape != (c,) or job.t.shape != (c,):
        return False
    return b is None or (b.shape == (c,) and b.dtype in arith._LIMITS)


def fold_conv_flat(w_flat: np.ndarray, per_channel: np.ndarray, s: np.ndarray, t: np.ndarray,
                   b_orig: np.ndarray, b_dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Many Conv folds over concatenated data: ``w_flat`` holds the weights (output channel by
    output channel, ``per_channel[c]`` values each), ``s``/``t``/``b_orig`` one value per output
    channel (``b_orig`` float64, zeros where a Conv had no bias). Returns the cast-back weights and
    biases, flat; raises ``FoldValueError`` if any value does not fit (the caller finds which)."""
    w_out = None
    if per_channel.size and per_channel.min() == per_channel.max() and w_flat.dtype in arith._LIMITS:
        # one row per output channel, folded block by block (no weight-sized float64 temporary)
        w_out = arith._scale_rows_cast(w_flat.reshape(-1, int(per_channel[0])), s)
    if w_out is None:  # mixed sizes, or a value that does not fit: cast_back names the problem
        w64 = np.multiply(w_flat, np.repeat(s, per_channel), dtype=np.float64)
        w_out = arith.cast_back(w64, w_flat.dtype, original=w_flat)
        del w64
    w_out = w_out.reshape(-1)
    return w_out, arith.cast_back(s * b_orig + t, b_dtype, original=b_orig)


def _fold_batch(jobs: list[ConvFold]) -> list[Folded]:
    """One concatenated pass over jobs sharing the weight dtype and the bias dtype."""
    ws = [j.weight for j in jobs]
    b_dtype = jobs[0].bias.dtype if jobs[0].bias is not None else ws[0].dtype
    chans = [w.shape[0] for w in ws]
    try:
        w_out, b_out = fold_conv_flat(
            np.concatenate([w.reshape(-1) for w in ws]),
            np.repeat([w.size // w.shape[0] for w in ws], chans),
            np.concatenate([j.s for j in jobs]), np.concatenate([j.t for j in jobs]),
            np.concatenate([_bias_original(j.bias, c) for j, c in zip(jobs, chans)], dtype=np.float64), b_dtype)
    except arith.FoldValueError:  # find out which fold it is, one at a time
        return [fold_conv_one(j) for j in jobs]
    return [(w_out[a:b].reshape(w.shape), b_out[c:d])
            for (a, b), (c, d), w in zip(bounds([w.size for w in ws]), bounds(chans), ws)]


def chunks(sizes: Sequence[int], limit: int) -> list[list[int]]:
    """Indices of ``sizes`` cut into consecutive runs whose sizes add up to at most ``limit`` (a
    size above ``limit`` makes a run of its own)."""
    runs: list[list[int]] = []
    run: list[int] = []
    total = 0
    for i, size in enumerate(sizes):
        if run and total + size > limit:
            runs.append(run)
            run, total = [], 0
        run.append(i)
        total += size
    if run:
        runs.append(run)
    return runs


def fold_conv_many(jobs: Sequence[ConvFold]) -> list[Folded]:
    """``fold_conv_one`` of every job, small ones in concatenated batches (the ONNX fold stage
    batches its small Conv folds through this function).

    A batch holds jobs of one weight dtype, one bias dtype (or none) and one weight size per
    output channel (so that ``fold_conv_flat`` scales rows in place), at most ``BATCH_ELEMENTS``
    weight values in all.
    """
    out: list[Folded | None] = [None] * len(jobs)
    groups: dict[tuple[object, ...], list[int]] = {}
    for i, job in enumerate(jobs):
        if _batchable(job):
            w = job.weight
            key = (w.dtype, None if job.bias is None else job.bias.dtype, w.size // w.shape[0])
            groups.setdefault(key, []).append(i)
        else:
            out[i] = fold_conv_one(job)
    for members in groups.values():
        for run in chunks([jobs[i].weight.size for i in members], BATCH_ELEMENTS):
            chunk = [members[k] for k in run]
            for i, res in zip(chunk, _fold_batch([jobs[i] for i in chunk])):
                out[i] = res
    return out  # type: ignore[return-value]
