"""Per-output error metrics for verification reports that CI pipelines can gate on.

Pure numpy: nothing here imports onnxruntime or onnx. ``ml_dtypes`` is used when it is importable
(bfloat16 arrays arrive as ``ml_dtypes.bfloat16``); without it bfloat16 is handled as raw ``uint16``
bit patterns.

Tolerances
----------
When neither a per-output nor a global value is given, ``(atol, rtol)`` is the output dtype's
default; the defaults, their reasoning and the precedence rule live in :mod:`bnfold.verification.tolerances`.
Integer, bool and string outputs are compared exactly; tolerances are ignored and recorded as 0.

Metric definitions
------------------
``a`` is the reference (frozen, unfolded model), ``b`` the candidate (folded model), both converted
to float64 (float16/bfloat16 exactly; bfloat16 from ``ml_dtypes`` arrays or from ``uint16`` bit
patterns), ``d = |a - b|`` elementwise. A position is a *finite pair* when both values are finite.
A non-finite position *agrees* when both are NaN or both are the same infinity; otherwise it
*disagrees*. ``bound = atol + rtol * |a|`` (``rtol * 0`` taken as 0 even for ``rtol = inf``).

- ``elements``: ``a.size``.
- ``max_abs``: ``max d`` over all positions, with agreeing non-finite positions counted as 0 and
  disagreeing ones as ``inf``; 0 for no elements.
- ``p99_abs`` / ``mean_abs`` / ``median_abs``: the 0.99 quantile (numpy's default linear
  interpolation) / mean / median of ``d`` over the finite pairs (0 when there are none). Non-finite
  positions are accounted for by ``nan_*``/``inf_*``, ``mismatches`` and ``max_abs``.
- ``max_rel``: ``max d / max(|a|, guard)`` over the finite pairs, ``guard = max(atol, smallest
  normal of the dtype)`` (float16 2**-14, float32/bfloat16 2**-126, float64 2**-1022; 1 for integer
  outputs), so elements with ``|a| < guard`` are divided by ``guard``; ``inf`` if any non-finite
  position disagrees.
- ``mismatches``: finite pairs with ``d > bound`` plus disagreeing non-finite positions;
  ``mismatch_pct = 100 * mismatches / elements`` (0 for no elements).
- ``worst_index`` / ``worst_ref`` / ``worst_cand``: the position of ``max_abs`` (first in C order on
  ties, so index 0 when all are equal) and the two values there; ``None`` without elements.
- ``min_atol``: the smallest atol with which every element passes at the given rtol,
  ``max(0, max(d - rtol*|a|))`` over the finite pairs, raised by the few ulps needed for the float64
  check ``d <= atol + rtol*|a|`` itself to pass; ``inf`` if a non-finite position disagrees.
- ``min_rtol``: the smallest rtol with which every element passes at the given atol,
  ``max over |a| > 0 of max(0, d - atol) / |a|`` (raised likewise by a few ulps); ``inf`` if an
  element with ``a == 0`` has ``d > atol`` or a non-finite position disagrees.
- ``cosine``: cosine similarity of the flattened finite pairs (each vector scaled by its max-abs
  first, so no overflow); 1.0 if both norms are 0, ``None`` if exactly one is.
- ``snr_db``: ``10*log10(sum a**2 / sum (a-b)**2)`` over the finite pairs (computed with scaling);
  ``inf`` when the error is zero, ``None`` when ``a`` is all zero and the error is not.
- ``max_ulp``: max ULP distance in the output's own dtype (float16, float32, float64, bfloat16):
  bit patterns mapped to a monotone integer line (``+x -> magnitude bits``, ``-x -> -magnitude bits``,
  so ``+0`` and ``-0`` are 0 apart and the smallest positive and negative subnormals 2 apart),
  over positions where neither value is NaN (infinities sit one step past the largest finite value).
  Exact Python int even beyond int64. ``None`` for other dtypes. Values given in a wider dtype are
  rounded to the output dtype first.
- ``nan_ref`` / ``nan_cand`` / ``inf_ref`` / ``inf_cand``: counts of NaN / +-inf.
- ``top1``: for float outputs of shape ``(N, K)``, ``N >= 1``, ``K >= 2``: the fraction of rows whose
  argmax (first on ties) agrees. ``top5`` (``K >= 5``): the fraction of rows where the reference's
  top-1 class has fewer than 5 classes with a strictly greater candidate score. Otherwise ``None``.

Noise floor (optional, ``floor``/``margin``): the reference's own float rounding noise per channel
(:mod:`bnfold.verification.noise_floor`). With a floor, a finite pair also passes when
``d <= margin * floor``; ``bound`` above becomes ``max(atol + rtol*|a|, margin*floor)`` in
``mismatches`` and the verdict, and the excess below becomes ``e = d - max(rtol*|a|, margin*floor
- atol)``. ``floor_max`` is the largest floor (None without one). ``min_atol``/``min_rtol`` ignore
the floor: they describe the tolerance rule alone.

Verdict (``passed``), by ``error_stat``:

- ``'max'``: every finite pair satisfies ``d <= bound`` and no non-finite position disagrees
  (i.e. ``mismatches == 0``).
- ``'mean'`` / ``'median'`` / ``'quantile'`` (``q = quantile``, linear interpolation): the statistic
  of the per-element excess ``e = d - rtol*|a|`` over the finite pairs is ``<= atol`` (the same rule
  ``d <= atol + rtol*|a|``, applied to a statistic); any disagreeing non-finite position fails; no
  finite pairs passes.
- shapes differ: fails, with ``max_abs`` (and every error magnitude) ``inf`` and ``mismatches ==
  elements``.
- integer / bool / string outputs: exact equality of values and of the two arrays' dtypes; recorded
  with ``atol = rtol = 0`` and ``error_stat = 'max'``. ``min_atol``/``min_rtol`` are 0 when equal and
  ``inf`` otherwise (no tolerance makes an exact comparison pass). Their ``max_rel`` divides by
  ``max(|a|, 1)``. String outputs report every error magnitude as 0 when all elements are equal and
  ``inf`` otherwise, ``worst_index`` at the first unequal element, and no values, cosine or SNR.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import numpy as np

from bnfold.errors import BadInputError
from bnfold.run_records import HIST_HI, HIST_LO, HIST_ZERO, OutputMetrics
from bnfold.verification.tolerances import is_float_dtype, normalize_dtype


def _import_ml_dtypes() -> ModuleType | None:
    try:  # pragma: no cover - depends on the environment
        return importlib.import_module("ml_dtypes")
    except ImportError:  # pragma: no cover
        return None


_ml_dtypes = _import_ml_dtypes()

__all__ = [
    "ERROR_STATS",
    "OutputMetrics",
    "compute_metrics",
    "compute_metrics_batched",
    "error_histogram",
]

ERROR_STATS = ("max", "mean", "median", "quantile")

# smallest positive normal value per float dtype
_TINY = {
    "float16": 2.0**-14,
    "float32": 2.0**-126,
    "bfloat16": 2.0**-126,
    "float64": 2.0**-1022,
}

_ULP_TYPES: dict[str, tuple[type[np.floating[Any]], type[np.signedinteger[Any]]]] = {
    "float16": (np.float16, np.int16),
    "float32": (np.float32, np.int32),
    "float64": (np.float64, np.int64),
}

_INF = float("inf")


def error_histogram(d: np.ndarray) -> tuple[tuple[int, int], ...]:
    """Counts of ``d`` (finite, >= 0) per decade; zeros under ``HIST_ZERO``."""
    if d.size == 0:
        return ()
    zeros = int(np.count_nonzero(d == 0))
    pos = d[d > 0]
    bins: dict[int, int] = {HIST_ZERO: zeros} if zeros else {}
    if pos.size:
        k = np.clip(np.floor(np.log10(pos)), HIST_LO, HIST_HI).astype(np.int64)
        values, counts = np.unique(k, return_counts=True)
        bins.update({int(v): int(c) for v, c in zip(values, counts)})
    return tuple(sorted(bins.items()))


# ---- dtype helpers ------------------------------------------------------------------------------
def _tiny(dtype_name: str) -> float:
    if dtype_name in _TINY:
        return _TINY[dtype_name]
    if _ml_dtypes is not None:
        try:
            return float(_ml_dtypes.finfo(getattr(_ml_dtypes, dtype_name)).tiny)
        except (AttributeError, TypeError, ValueError):
            pass
    return _TINY["float32"]


def _bf16_bits(array: np.ndarray) -> np.ndarray:
    """bfloat16 values as uint16 bit patterns (float input is rounded to nearest even)."""
    array = np.asarray(array)
    if array.dtype == np.uint16:
        return array
    if array.dtype.name == "bfloat16":
        return array.view(np.uint16)
    f32 = np.ascontiguousarray(array, dtype=np.float32)
    if _ml_dtypes is not None:
        return f32.astype(_ml_dtypes.bfloat16).view(np.uint16)
    bits = f32.view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    quiet_nan = ((bits >> 16) | np.uint32(0x0040)).astype(np.uint16)
    return np.where(np.isnan(f32), quiet_nan, rounded)


def _to_float64(array: np.ndarray, dtype_name: str) -> np.ndarray:
    array = np.asarray(array)
    if dtype_name == "bfloat16" and array.dtype == np.uint16:
        return (array.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    if array.dtype.kind in "iub" and dtype_name not in _TINY:
        # float8 and the like: an integer array is most likely raw bit patterns
        raise BadInputError(
            f"cannot decode {dtype_name} values from a {array.dtype.name} array; "
            "give them as float arrays (bfloat16 may also come as uint16 bit patterns)"
        )
    return array.astype(np.float64)


def _ulp_keys(array: np.ndarray, values: np.ndarray, dtype_name: str) -> np.ndarray | None:
    """Bit patterns on a monotone int64 line: +x -> magnitude bits, -x -> -magnitude bits."""
    if dtype_name == "bfloat16":
        signed = _bf16_bits(array).view(np.int16)
        mask = 0x7FFF
    elif dtype_name in _ULP_TYPES:
        ftype, itype = _ULP_TYPES[dtype_name]
        arr = np.asarray(array)
        if arr.dtype != ftype:
            with np.errstate(over="ignore"):
                arr = values.astype(ftype)
        signed = np.ascontiguousarray(arr).view(itype)
        mask = np.iinfo(itype).max
    else:
        return None
    wide = signed.astype(np.int64)
    mag = wide & np.int64(mask)
    return np.where(wide < 0, -mag, mag)


def _abs_diff_u64(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """|x - y| of two int64 arrays, exact, as uint64 (cannot overflow: |x - y| < 2**64)."""
    ux = x.view(np.uint64)
    uy = y.view(np.uint64)
    return np.where(x >= y, ux - uy, uy - ux)


# ---- small numeric pieces -----------------------------------------------------------------------
def _within(d: np.ndarray, m: np.ndarray, atol: float, rtol: float) -> np.ndarray:
    """``d <= atol + rtol*m`` elementwise, with ``rtol*0 == 0`` even for ``rtol = inf``."""
    with np.errstate(invalid="ignore", over="ignore"):
        scaled = np.where(m > 0, rtol * m, 0.0)
        return d <= atol + scaled


def _raise_until(value: float, ok: Callable[[float], bool]) -> float:
    """``value`` raised by as little as needed (a few ulps in practice) for ``ok`` to hold."""
    if ok(value):
        return value
    step = max(float(np.spacing(value)), 5e-324)
    while True:
        value = value + step
        if not math.isfinite(value) or ok(value):
            return value
        step *= 2.0


def _quantile(x: np.ndarray, q: float) -> float:
    """numpy's linear quantile, with ``inf`` (not NaN) where it interpolates towards an ``inf``."""
    with np.errstate(invalid="ignore"):
        r = float(np.quantile(x, q))
    if math.isnan(r):  # inf - inf in the interpolation: the upper neighbour is inf
        r = float(np.quantile(x, q, method="higher"))
    return r


def _cosine(x: np.ndarray, y: np.ndarray) -> float | None:
    sx = float(np.max(np.abs(x), initial=0.0))
    sy = float(np.max(np.abs(y), initial=0.0))
    if sx == 0.0 and sy == 0.0:
        return 1.0
    if sx == 0.0 or sy == 0.0:
        return None
    xn = x / sx
    yn = y / sy
    c = float(np.dot(xn, yn)) / math.sqrt(float(np.dot(xn, xn)) * float(np.dot(yn, yn)))
    return min(1.0, max(-1.0, c))


def _snr_db(x: np.ndarray, y: np.ndarray) -> float | None:
    with np.errstate(over="ignore", invalid="ignore"):
        err = x - y
    se = float(np.max(np.abs(err), initial=0.0))
    if se == 0.0:
        return _INF
    sr = float(np.max(np.abs(x), initial=0.0))
    if sr == 0.0:
        return None
    if not math.isfinite(se):
        return -_INF
    pr = float(np.sum(np.square(x / sr)))
    pe = float(np.sum(np.square(err / se)))
    return 20.0 * (math.log10(sr) - math.log10(se)) + 10.0 * math.log10(pr / pe)


def _top_k(a: np.ndarray, b: np.ndarray) -> tuple[float | None, float | None]:
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 2:
        return None, None
    ra = np.argmax(a, axis=1)
    rb = np.argmax(b, axis=1)
    top1 = float(np.mean(ra == rb))
    top5 = None
    if a.shape[1] >= 5:
        score = b[np.arange(a.shape[0]), ra]
        with np.errstate(invalid="ignore"):
            greater = np.sum(b > score[:, None], axis=1)
        top5 = float(np.mean(greater < 5))
    return top1, top5


def _check_tol(value: float, what: str) -> float:
    value = float(value)
    if math.isnan(value) or value < 0:
        raise BadInputError(f"{what} must be a number >= 0, got {value!r}")
    return value


def _worst(diff: np.ndarray, a: np.ndarray | None,
           b: np.ndarray | None) -> tuple[tuple[int, ...] | None, float | None, float | None]:
    if diff.size == 0:
        return None, None, None
    k = int(np.argmax(diff.ravel()))
    index = tuple(int(i) for i in np.unravel_index(k, diff.shape))
    if a is None or b is None:
        return index, None, None
    return index, float(a.ravel()[k]), float(b.ravel()[k])


def _count(mask: np.ndarray) -> int:
    return int(np.count_nonzero(mask))


# ---- the three result builders ------------------------------------------------------------------
def _shape_mismatch(name: str, dtype_name: str, ref: np.ndarray, cand: np.ndarray, atol: float, rtol: float,
                    error_stat: str, q: float | None) -> OutputMetrics:
    def counts(arr: np.ndarray) -> tuple[int, int]:
        try:
            values = _to_float64(arr, dtype_name) if is_float_dtype(dtype_name) else None
        except BadInputError:
            values = None
        if values is None:
            return 0, 0
        return _count(np.isnan(values)), _count(np.isinf(values))

    nan_ref, inf_ref = counts(ref)
    nan_cand, inf_cand = counts(cand)
    n = int(ref.size)
    return OutputMetrics(
        name=name, dtype=dtype_name, shape=tuple(int(s) for s in ref.shape), atol=atol, rtol=rtol,
        error_stat=error_stat, quantile=q, passed=False, elements=n,
        max_abs=_INF, p99_abs=_INF, mean_abs=_INF, median_abs=_INF, max_rel=_INF,
        mismatches=n, mismatch_pct=100.0, worst_index=None, worst_ref=None, worst_cand=None,
        min_atol=_INF, min_rtol=_INF, cosine=None, snr_db=None, max_ulp=None,
        nan_ref=nan_ref, nan_cand=nan_cand, inf_ref=inf_ref, inf_cand=inf_cand, top1=None, top5=None,
    )


def _exact(name: str, dtype_name: str, ref: np.ndarray, cand: np.ndarray) -> OutputMetrics:
    n = int(ref.size)
    shape = tuple(int(s) for s in ref.shape)
    same_dtype = ref.dtype == cand.dtype
    if ref.dtype.kind in "OUSV" or cand.dtype.kind in "OUSV":
        eq = np.asarray(ref == cand)
        if eq.shape != ref.shape:
            eq = np.zeros(ref.shape, dtype=bool)
        neq = ~eq.astype(bool)
        mismatches = _count(neq)
        err = _INF if mismatches else 0.0
        diff = neq.astype(np.float64)
        index = _worst(diff, None, None)[0]
        return OutputMetrics(
            name=name, dtype=dtype_name, shape=shape, atol=0.0, rtol=0.0, error_stat="max",
            quantile=None, passed=mismatches == 0 and same_dtype, elements=n,
            max_abs=err, p99_abs=err, mean_abs=err, median_abs=err, max_rel=err,
            mismatches=mismatches, mismatch_pct=100.0 * mismatches / n if n else 0.0,
            worst_index=index, worst_ref=None, worst_cand=None, min_atol=err, min_rtol=err,
            cosine=None, snr_db=None, max_ulp=None, nan_ref=0, nan_cand=0, inf_ref=0, inf_cand=0,
            top1=None, top5=None,
        )

    if ref.dtype.kind in "bu" and cand.dtype.kind in "bu":
        x = ref.astype(np.uint64)
        y = cand.astype(np.uint64)
        udiff = np.where(x >= y, x - y, y - x)
    else:
        udiff = _abs_diff_u64(ref.astype(np.int64), cand.astype(np.int64))
    diff = udiff.astype(np.float64)
    a = ref.astype(np.float64)
    b = cand.astype(np.float64)
    mismatches = _count(udiff != 0)
    index, worst_ref, worst_cand = _worst(diff, a, b)
    flat = diff.ravel()
    limit = 0.0 if mismatches == 0 else _INF
    return OutputMetrics(
        name=name, dtype=dtype_name, shape=shape, atol=0.0, rtol=0.0, error_stat="max",
        quantile=None, passed=mismatches == 0 and same_dtype, elements=n,
        max_abs=float(flat.max(initial=0.0)),
        p99_abs=_quantile(flat, 0.99) if n else 0.0,
        mean_abs=float(flat.mean()) if n else 0.0,
        median_abs=float(np.median(flat)) if n else 0.0,
        max_rel=float((flat / np.maximum(np.abs(a.ravel()), 1.0)).max(initial=0.0)),
        mismatches=mismatches, mismatch_pct=100.0 * mismatches / n if n else 0.0,
        worst_index=index, worst_ref=worst_ref, worst_cand=worst_cand,
        min_atol=limit, min_rtol=limit,
        cosine=_cosine(a.ravel(), b.ravel()), snr_db=_snr_db(a.ravel(), b.ravel()), max_ulp=None,
        nan_ref=0, nan_cand=0, inf_ref=0, inf_cand=0, top1=None, top5=None,
    )


def _broadcast_floor(floor: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """``floor`` (per channel ``(C,)`` or a scalar) as an array broadcastable to ``shape``: along axis 1
    when the channel counts agree, else its maximum everywhere."""
    if floor is None:
        return None
    f = np.asarray(floor, dtype=np.float64)
    if f.ndim == 1 and len(shape) >= 2 and shape[1] == f.shape[0]:
        return f.reshape((1, f.shape[0]) + (1,) * (len(shape) - 2))
    return np.asarray(float(f.max(initial=0.0)))


def _floating(name: str, dtype_name: str, ref: np.ndarray, cand: np.ndarray, atol: float, rtol: float,
              error_stat: str, q: float | None, floor: np.ndarray | None = None,
              margin: float = 0.0) -> OutputMetrics:
    a = _to_float64(ref, dtype_name)
    b = _to_float64(cand, dtype_name)
    n = int(a.size)
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    inf_a, inf_b = np.isinf(a), np.isinf(b)
    fin = np.isfinite(a) & np.isfinite(b)
    with np.errstate(invalid="ignore"):
        agree = ~fin & ((nan_a & nan_b) | (a == b))
    disagree = ~fin & ~agree
    n_disagree = _count(disagree)

    with np.errstate(over="ignore", invalid="ignore"):
        diff = np.where(fin, np.abs(a - b), np.where(disagree, _INF, 0.0))
    df = diff[fin]
    mf = np.abs(a[fin])
    ok = _within(df, mf, atol, rtol)
    fl = _broadcast_floor(floor, a.shape)
    # margin * floor per finite element (0 without a floor): an element within it passes too
    noise = (np.broadcast_to(fl, a.shape)[fin] * margin) if fl is not None else np.zeros_like(df)
    ok |= df <= noise
    mismatches = _count(~ok) + n_disagree

    index, worst_ref, worst_cand = _worst(diff, a, b)
    max_abs = float(diff.max(initial=0.0))

    guard = max(atol, _tiny(dtype_name))
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        rel = np.where(df == 0, 0.0, df / np.maximum(mf, guard))
    max_rel = _INF if n_disagree else float(rel.max(initial=0.0))

    with np.errstate(over="ignore", invalid="ignore"):
        # d - allowance beyond atol: the rule 'd <= atol + rtol*|a| or d <= margin*floor' is excess <= atol
        excess = df - np.maximum(np.where(mf > 0, rtol * mf, 0.0), noise - atol)

    if n_disagree:
        min_atol = _INF
        min_rtol = _INF
    else:
        start = max(0.0, float(excess.max(initial=0.0)))
        min_atol = _raise_until(start, lambda t: bool(_within(df, mf, t, rtol).all()))
        zero = mf == 0
        if np.any(df[zero] > atol):
            min_rtol = _INF
        else:
            pos = ~zero
            dp, mp = df[pos], mf[pos]
            with np.errstate(over="ignore", invalid="ignore"):
                need = np.maximum(dp - atol, 0.0) / mp
            start = max(0.0, float(need.max(initial=0.0)))
            min_rtol = _raise_until(start, lambda t: bool(_within(dp, mp, atol, t).all()))

    if error_stat == "max":
        passed = mismatches == 0
    elif n_disagree:
        passed = False
    elif excess.size == 0:
        passed = True
    else:
        if error_stat == "mean":
            stat = float(np.mean(excess))
        elif error_stat == "median":
            stat = float(np.median(excess))
        else:
            assert q is not None  # compute_metrics sets q whenever error_stat is 'quantile'
            stat = _quantile(excess, q)
        passed = stat <= atol

    af, bf = a[fin], b[fin]
    keys_ok = ~(nan_a | nan_b)
    keys_a = _ulp_keys(ref, a, dtype_name)
    max_ulp = None
    if keys_a is not None:
        keys_b = _ulp_keys(cand, b, dtype_name)
        assert keys_b is not None  # same dtype_name as keys_a: _ulp_keys returns None for neither
        ulp = _abs_diff_u64(keys_a[keys_ok], keys_b[keys_ok])
        max_ulp = int(ulp.max(initial=0))

    top1, top5 = _top_k(a, b)
    return OutputMetrics(
        name=name, dtype=dtype_name, shape=tuple(int(s) for s in a.shape), atol=atol, rtol=rtol,
        error_stat=error_stat, quantile=q, passed=bool(passed), elements=n,
        max_abs=max_abs,
        p99_abs=_quantile(df, 0.99) if df.size else 0.0,
        mean_abs=float(np.mean(df)) if df.size else 0.0,
        median_abs=float(np.median(df)) if df.size else 0.0,
        max_rel=max_rel, mismatches=mismatches,
        mismatch_pct=100.0 * mismatches / n if n else 0.0,
        worst_index=index, worst_ref=worst_ref, worst_cand=worst_cand,
        min_atol=float(min_atol), min_rtol=float(min_rtol),
        cosine=_cosine(af, bf), snr_db=_snr_db(af, bf), max_ulp=max_ulp,
        nan_ref=_count(nan_a), nan_cand=_count(nan_b), inf_ref=_count(inf_a), inf_cand=_count(inf_b),
        top1=top1, top5=top5, error_histogram=error_histogram(df),
        floor_max=None if fl is None else float(np.max(fl, initial=0.0)),
    )


# ---- public API ---------------------------------------------------------------------------------
def _complex_as_real(a: np.ndarray) -> np.ndarray:
    """A complex array as its real and imaginary parts (a trailing axis of 2); a real one unchanged
    but for that axis (imaginary part 0), so a complex output compares against a real one too."""
    if a.dtype.kind == "c":
        return np.stack([a.real, a.imag], axis=-1)
    a = a.astype(np.float64) if a.dtype.kind not in "f" else a
    return np.stack([a, np.zeros_like(a)], axis=-1)


def compute_metrics(
    name: str,
    ref: np.ndarray,
    cand: np.ndarray,
    *,
    dtype: str | None = None,
    atol: float,
    rtol: float,
    error_stat: str = "max",
    quantile: float = 0.99,
    floor: np.ndarray | None = None,
    margin: float = 0.0,
) -> OutputMetrics:
    """All metrics for one output (see the module docstring for definitions and the verdict).

    ``floor`` (float outputs only): the reference's noise floor, per channel (shape ``(C,)``, axis 1)
    or one value; an element also passes when ``d <= margin * floor`` (see the module docstring).

    ``dtype`` is the output's dtype name (``'float32'``, ``'bfloat16'``, ``'int64'``...; the
    reference array's dtype when ``None``). With ``dtype='bfloat16'`` either array may be an
    ``ml_dtypes.bfloat16`` array or raw ``uint16`` bit patterns. ``error_stat`` is one of
    :data:`ERROR_STATS`; ``quantile`` (in [0, 1]) is used by ``'quantile'`` only. Raises
    :class:`BadInputError` for a negative/NaN tolerance, an unknown statistic or a bad quantile.
    """
    atol = _check_tol(atol, "atol")
    rtol = _check_tol(rtol, "rtol")
    if error_stat not in ERROR_STATS:
        raise BadInputError(
            f"unknown error statistic {error_stat!r}; use one of {', '.join(ERROR_STATS)}"
        )
    q: float | None = None
    if error_stat == "quantile":
        q = float(quantile)
        if not 0.0 <= q <= 1.0:
            raise BadInputError(f"quantile must be in [0, 1], got {quantile!r}")
    ref = np.asarray(ref)
    cand = np.asarray(cand)
    if ref.dtype.kind == "c" or cand.dtype.kind == "c":  # real and imaginary parts as a trailing axis of 2
        complex_name = normalize_dtype(dtype or ref.dtype.name)
        ref, cand = _complex_as_real(ref), _complex_as_real(cand)
        part = "float64" if complex_name == "complex128" else "float32"
        got = compute_metrics(name, ref, cand, dtype=part, atol=atol, rtol=rtol, error_stat=error_stat,
                              quantile=quantile, floor=floor, margin=margin)
        return dataclasses.replace(got, dtype=complex_name)
    dtype_name = normalize_dtype(dtype or ref.dtype.name)
    if not is_float_dtype(dtype_name):
        atol, rtol, error_stat, q = 0.0, 0.0, "max", None
    if ref.shape != cand.shape:
        return _shape_mismatch(name, dtype_name, ref, cand, atol, rtol, error_stat, q)
    if not is_float_dtype(dtype_name):
        return _exact(name, dtype_name, ref, cand)
    if floor is not None and (margin < 0 or not math.isfinite(margin)):
        raise BadInputError(f"noise-floor margin must be a finite number >= 0, got {margin!r}")
    return _floating(name, dtype_name, ref, cand, atol, rtol, error_stat, q, floor, margin)


def compute_metrics_batched(
    name: str, refs: Sequence[np.ndarray], cands: Sequence[np.ndarray], **kw: Any
) -> OutputMetrics:
    """Metrics over successive batches of one output, as :func:`compute_metrics` of their concatenation.

    Batches are concatenated along axis 0 (``worst_index[0]`` is then the sample index across all
    batches). 0-d batches are stacked into shape ``(batches,)``; batches whose trailing dims differ
    (dynamic shapes) are flattened and concatenated into shape ``(total elements,)``, where
    ``worst_index`` is a flat position and ``top1``/``top5`` are not computed. A batch whose reference
    and candidate shapes differ fails the output like a shape mismatch, over all elements.
    ``kw`` is passed to :func:`compute_metrics`. Raises :class:`BadInputError` when the two lists
    differ in length or are empty.
    """
    if len(refs) != len(cands):
        raise BadInputError(
            f"output {name!r}: {len(refs)} reference batch(es) but {len(cands)} candidate batch(es)"
        )
    if not refs:
        raise BadInputError(f"output {name!r}: no batches to compare")
    dtype_name = normalize_dtype(kw.get("dtype") or np.asarray(refs[0]).dtype.name)
    kw = dict(kw, dtype=dtype_name)

    def prepared(arr: np.ndarray) -> np.ndarray:
        arr = np.asarray(arr)
        return _bf16_bits(arr) if dtype_name == "bfloat16" else arr

    rs = [prepared(r) for r in refs]
    cs = [prepared(c) for c in cands]

    def joined(arrays: list[np.ndarray]) -> np.ndarray:
        if all(x.ndim == 0 for x in arrays):
            return np.stack(arrays)
        if all(x.ndim >= 1 for x in arrays) and len({x.shape[1:] for x in arrays}) == 1:
            return np.concatenate(arrays, axis=0)
        return np.concatenate([x.ravel() for x in arrays])

    ref = joined(rs)
    if any(r.shape != c.shape for r, c in zip(rs, cs)):
        # run the argument checks, then report the mismatch over all elements
        atol = _check_tol(kw["atol"], "atol")
        rtol = _check_tol(kw["rtol"], "rtol")
        error_stat = kw.get("error_stat", "max")
        q = float(kw.get("quantile", 0.99)) if error_stat == "quantile" else None
        if not is_float_dtype(dtype_name):
            atol, rtol, error_stat, q = 0.0, 0.0, "max", None
        cand = np.concatenate([c.ravel() for c in cs])
        return _shape_mismatch(name, dtype_name, ref, cand, atol, rtol, error_stat, q)
    return compute_metrics(name, ref, joined(cs), **kw)
