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

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import NamedTuple, Protocol, TypeAlias

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


class ConvSpec(NamedTuple):
    """What batching needs to know of one backward Conv fold before reading its values: the
    weight's shape and dtype, whether there is a bias and its dtype, and the BN's (s, t).
    A dtype of None is one batching does not handle (the fold is done one at a time)."""

    shape: tuple[int, ...]
    w_dtype: np.dtype | None
    has_bias: bool
    b_dtype: np.dtype | None
    s: np.ndarray  # float64 (C_out,)
    t: np.ndarray


class ConvValues(Protocol):
    """Where ``fold_convs`` reads the weights and biases of the folds it was given."""

    def concatenated(self, members: list[int]) -> tuple[np.ndarray, np.ndarray | None] | None:
        """The members' weights flattened and concatenated (in ``members`` order), and their
        biases likewise (None where they have none); None if they cannot be read in one piece or
        a bias is not of shape ``(C_out,)`` (the folds are then done one at a time)."""
        ...

    def job(self, i: int) -> ConvFold:
        """Fold ``i`` as arrays, for folding it on its own."""
        ...


def _batchable(spec: ConvSpec, size: int) -> bool:
    """Whether the fold of ``spec`` (a weight of ``size`` values) can go into a batch."""
    shape = spec.shape
    if len(shape) < 3 or size > BATCH_ELEMENTS // 4 or spec.w_dtype not in arith._LIMITS:
        return False
    c = shape[0]
    if not c or spec.s.shape != (c,) or spec.t.shape != (c,):
        return False
    return not spec.has_bias or spec.b_dtype in arith._LIMITS


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


class RawValue:
    """A value as the raw little-endian bytes of an array of ``dtype`` and ``shape`` (a folded
    tensor of a batch: the writer stores the bytes without a numpy round trip)."""

    __slots__ = ("data", "dtype", "shape")

    def __init__(self, data: bytes, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.data, self.shape, self.dtype = data, shape, dtype

    def array(self) -> np.ndarray:
        return np.frombuffer(self.data, dtype=self.dtype).reshape(self.shape)


class FlatFolded:
    """One batch's folded weights and biases, flat (cast back to the weight's and the bias's
    dtypes), and where each fold's share of them lies."""

    __slots__ = ("_raw", "b_starts", "bias", "shapes", "w_starts", "weights")

    def __init__(self, weights: np.ndarray, bias: np.ndarray, shapes: list[tuple[int, ...]], sizes: list[int],
                 chans: list[int]) -> None:
        self.weights, self.bias, self.shapes = weights, bias, shapes
        # fold k's share is [starts[k], starts[k + 1]) (plain ints: nothing for the garbage collector)
        self.w_starts, self.b_starts = list(accumulate(sizes, initial=0)), list(accumulate(chans, initial=0))
        self._raw: tuple[bytes, bytes] | None = None

    def arrays(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Fold ``k``'s (weight, bias)."""
        a, b, c, d = self.w_starts[k], self.w_starts[k + 1], self.b_starts[k], self.b_starts[k + 1]
        return self.weights[a:b].reshape(self.shapes[k]), self.bias[c:d]

    def raw(self, k: int) -> tuple[RawValue, RawValue]:
        """Fold ``k``'s (weight, bias) as raw bytes (the batch's bytes are made once)."""
        if self._raw is None:
            self._raw = self.weights.tobytes(), self.bias.tobytes()
        w_raw, b_raw = self._raw
        a, b, c, d = self.w_starts[k], self.w_starts[k + 1], self.b_starts[k], self.b_starts[k + 1]
        wi, bi = self.weights.itemsize, self.bias.itemsize
        shape = self.shapes[k]
        return (RawValue(w_raw[a * wi:b * wi], shape, self.weights.dtype),
                RawValue(b_raw[c * bi:d * bi], (shape[0],), self.bias.dtype))


class BatchShare:
    """One fold's share of a batch: ``batch.arrays(k)`` or ``batch.raw(k)`` (one small object per
    fold until it is written: thousands of folds make little work for the garbage collector)."""

    __slots__ = ("batch", "k")

    def __init__(self, batch: FlatFolded, k: int) -> None:
        self.batch, self.k = batch, k

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return self.batch.arrays(self.k)

    def raw(self) -> tuple[RawValue, RawValue]:
        return self.batch.raw(self.k)


# one Conv's result from ``fold_convs``: its share of a batch, or folded on its own
BatchFolded: TypeAlias = BatchShare | Folded


def _fold_batch(specs: Sequence[ConvSpec], members: list[int], sizes: list[int],
                values: ConvValues) -> list[BatchFolded]:
    """One concatenated pass over folds (weights of ``sizes`` values) sharing the weight dtype, the
    bias dtype (or none) and the weight size per output channel."""
    one = [specs[i] for i in members]
    flat = values.concatenated(members)
    if flat is None:  # not readable in one piece: one at a time
        return [fold_conv_one(values.job(i)) for i in members]
    w_flat, b_flat = flat
    shapes = [spec.shape for spec in one]
    chans = [shape[0] for shape in shapes]
    b_dtype = b_flat.dtype if b_flat is not None else w_flat.dtype
    b_orig = b_flat.astype(np.float64) if b_flat is not None else np.zeros(sum(chans))
    try:
        w_out, b_out = fold_conv_flat(
            w_flat, np.repeat([n // c for n, c in zip(sizes, chans)], chans),
            np.concatenate([spec.s for spec in one]), np.concatenate([spec.t for spec in one]), b_orig, b_dtype)
    except arith.FoldValueError:  # find out which fold it is, one at a time
        return [fold_conv_one(values.job(i)) for i in members]
    batch = FlatFolded(w_out, b_out, shapes, sizes, chans)
    return [BatchShare(batch, k) for k in range(len(members))]


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


def fold_convs(specs: Sequence[ConvSpec], values: ConvValues) -> list[BatchFolded]:
    """``fold_conv_one`` of every fold, small ones in concatenated batches read through ``values``
    (the ONNX fold stage batches its small Conv folds through this function, reading raw
    initializer data; ``fold_conv_many`` through it over arrays).

    A batch holds folds of one weight dtype, one bias dtype (or none) and one weight size per
    output channel (so that ``fold_conv_flat`` scales rows in place), at most ``BATCH_ELEMENTS``
    weight values in all.
    """
    out: list[BatchFolded | None] = [None] * len(specs)
    groups: dict[tuple[object, ...], tuple[list[int], list[int]]] = {}  # key -> (folds, weight sizes)
    for i, spec in enumerate(specs):
        size = math.prod(spec.shape)
        if _batchable(spec, size):
            members, sizes = groups.setdefault((spec.w_dtype, spec.b_dtype, size // spec.shape[0]), ([], []))
            members.append(i)
            sizes.append(size)
        else:
            out[i] = fold_conv_one(values.job(i))
    for members, sizes in groups.values():
        for run in chunks(sizes, BATCH_ELEMENTS):
            chunk = [members[k] for k in run]
            for i, res in zip(chunk, _fold_batch(specs, chunk, [sizes[k] for k in run], values)):
                out[i] = res
    return out  # type: ignore[return-value]


class _Arrays:
    """``ConvValues`` over ``ConvFold`` jobs: their arrays, concatenated."""

    def __init__(self, jobs: Sequence[ConvFold]) -> None:
        self.jobs = jobs

    def concatenated(self, members: list[int]) -> tuple[np.ndarray, np.ndarray | None] | None:
        jobs = [self.jobs[i] for i in members]
        w = np.concatenate([j.weight.reshape(-1) for j in jobs])
        if any(j.bias is not None and j.bias.shape != (j.weight.shape[0],) for j in jobs):
            return None
        biases = [j.bias for j in jobs if j.bias is not None]
        return w, (np.concatenate(biases) if biases else None)

    def job(self, i: int) -> ConvFold:
        return self.jobs[i]


def spec_of(job: ConvFold) -> ConvSpec:
    """The ``ConvSpec`` of a fold given as arrays."""
    b = job.bias
    return ConvSpec(job.weight.shape, job.weight.dtype, b is not None, None if b is None else b.dtype,
                    job.s, job.t)


def fold_conv_many(jobs: Sequence[ConvFold]) -> list[Folded]:
    """``fold_conv_one`` of every job, small ones in concatenated batches (``fold_convs`` over the
    jobs' arrays)."""
    return [r.arrays() if isinstance(r, BatchShare) else r
            for r in fold_convs([spec_of(j) for j in jobs], _Arrays(jobs))]
