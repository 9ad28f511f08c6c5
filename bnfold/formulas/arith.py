"""Tensor-level fold arithmetic: arrays in, new float64 arrays out.

This module implements the formulas of the design note ``docs/math.md`` ("the mathematics bnfold
implements"), sections 1, 3 and 4, and nothing else; it knows no graphs. Every function is pure:
it never modifies its inputs, computes in float64 and returns new float64 arrays. ``cast_back``
converts a result to the producer's dtype and refuses values that the dtype cannot represent.

BatchNorm at inference (docs/math.md section 1), per channel c::

    y = s_c * x + t_c,   s_c = gamma_c / sqrt(var_c + eps),   t_c = beta_c - s_c * mu_c

Backward fold into the producer z = W * x + b (docs/math.md section 3)::

    y = W' * x + b',   b' = s * b + t,   W' = W with output channel c scaled by s_c

where the output-channel axis of W depends on the producer:

* Conv ``(C_out, C_in/groups, k...)``: axis 0, for every rank and group count.
* ConvTranspose ``(C_in, C_out/groups, k...)``: output channel ``g*(C_out/groups) + j`` is
  ``W[g*C_in/groups:(g+1)*C_in/groups, j]``; reshape to ``(groups, C_in/groups, C_out/groups,
  k...)`` and scale axis 2 by ``s.reshape(groups, C_out/groups)``. (Scaling axis 1 by ``s``
  as if it held all output channels is wrong as soon as ``groups > 1``.)
* Gemm ``Y = alpha*A@B + beta*C``: B is ``(K, N)`` (scale axis 1) or ``(N, K)`` with transB
  (scale axis 0); the new node keeps alpha, has beta = 1 and ``C' = beta*s*C + t`` with C
  broadcast to ``(N,)`` first (0 when absent). transA plays no part.
* MatMul ``x @ W`` with constant ``(K, N)`` W (and an optional following constant bias):
  axis 1.

Forward fold of BN into the following unpadded Conv (docs/math.md section 4)::

    Conv_W(s*x + t) = Conv_{W * s along the input-channel axis}(x) + sum_{c_in, k} W * t

where input channel j of the weight of output channel o (group ``o // (C_out/groups)``) is
input channel ``group*(C_in/groups) + j`` of x. The caller checks that the Conv pads nothing.

Representability (docs/math.md section 3): ``cast_back`` raises ``FoldValueError`` when a folded
value overflows the target dtype or becomes zero/subnormal where the original was normal.
"""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "FoldValueError",
    "bn_scale_shift",
    "cast_back",
    "fold_conv",
    "fold_conv_cast",
    "fold_conv_transpose",
    "fold_forward_conv",
    "fold_gemm",
    "fold_matmul",
    "groups_divide",
]


# ----------------------------------------------------------------------------- helpers


def _f64(a: Any, name: str) -> np.ndarray:
    """``a`` as a float64 array (a copy whenever the dtype differs; never written to)."""
    try:
        return np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} cannot be converted to float64: {exc}") from None


def _vec(a: Any, name: str, c: int | None = None) -> np.ndarray:
    """A 1-D float64 vector, of length ``c`` when given."""
    v = _f64(a, name)
    if v.ndim != 1:
        raise ValueError(f"{name} must be 1-D (C,), got shape {v.shape}")
    if c is not None and v.shape[0] != c:
        raise ValueError(f"{name} has {v.shape[0]} channels, expected {c}")
    return v


def _scale_shift(s: Any, t: Any, c: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate the BN scale/shift against the ``c`` channels of ``what``."""
    s64 = _f64(s, "s")
    t64 = _f64(t, "t")
    if s64.ndim != 1 or t64.ndim != 1 or s64.shape != t64.shape:
        raise ValueError(f"s and t must be 1-D of equal length, got {s64.shape} and {t64.shape}")
    if s64.shape[0] != c:
        raise ValueError(f"BN has {s64.shape[0]} channels but {what} has {c}")
    return s64, t64


def _bias_or_zeros(bias: Any, c: int, name: str = "bias") -> np.ndarray:
    return np.zeros(c, dtype=np.float64) if bias is None else _vec(bias, name, c)


def groups_divide(groups: Any, channels: int) -> bool:
    """Whether ``groups`` is a positive integer that divides ``channels``: the condition ONNX puts on
    a grouped Conv/ConvTranspose (C_in for ConvTranspose, C_out for a Conv's weight). The rules
    check it when planning, so that an invalid node is kept with a reason, never folded."""
    try:
        g = int(groups)
    except (TypeError, ValueError):
        return False
    return g == groups and g >= 1 and channels % g == 0


def _groups_of(groups: Any, total: int, what: str) -> int:
    g = int(groups)
    if g != groups or g < 1:
        raise ValueError(f"groups must be a positive integer, got {groups!r}")
    if total % g:
        raise ValueError(f"groups={g} does not divide {what}={total}")
    return g


def _conv_weight(weight: Any, kind: str) -> np.ndarray:
    w = _f64(weight, "weight")
    if w.ndim < 3:
        raise ValueError(f"{kind} weight must have rank >= 3 (channels, channels, k...), got shape {w.shape}")
    return w


def _to_vector(c: Any, n: int, name: str) -> np.ndarray:
    """Broadcast a constant that is uniform along rows to shape ``(n,)``.

    Accepts a scalar and shapes ``(1,)``, ``(n,)``, ``(1, n)``, ``(1, 1)``, or more generally any
    shape whose leading dims are all 1 and whose last dim is 1 or n. Anything else (e.g. a per-row
    ``(M, n)`` or ``(M, 1)`` constant) cannot be written as a per-column bias: ValueError.
    """
    a = _f64(c, name)
    if a.ndim == 0:
        return np.full(n, float(a), dtype=np.float64)
    if any(d != 1 for d in a.shape[:-1]):
        raise ValueError(
            f"{name} of shape {a.shape} varies along rows (per-row); it is not a per-column bias of length {n}"
        )
    last = a.shape[-1]
    if last not in (1, n):
        raise ValueError(f"{name} of shape {a.shape} does not broadcast to ({n},)")
    return np.array(np.broadcast_to(a.reshape(last), (n,)), dtype=np.float64)


def _along(v: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """Reshape a 1-D ``v`` so that it broadcasts along ``axis`` of a rank-``ndim`` array."""
    shape = [1] * ndim
    shape[axis] = v.shape[0]
    return v.reshape(shape)


# ----------------------------------------------------------------------------- BN


def bn_scale_shift(gamma: Any, beta: Any, mean: Any, var: Any, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``(s, t)`` of an inference BN (docs/math.md section 1), float64, shape (C,).

    ``s = gamma / sqrt(var + eps)``, ``t = beta - s * mean``. ``gamma``/``beta`` may be None
    (a BN without affine parameters: gamma = 1, beta = 0). Raises ValueError on mismatched
    shapes, where ``var + eps`` is not a positive finite number, or where ``gamma``, ``beta`` or
    ``mean`` holds NaN or Inf (the BN computes NaN there: no fold of it exists).
    """
    mu = _vec(mean, "mean")
    c = mu.shape[0]
    v = _vec(var, "var", c)
    g = np.ones(c) if gamma is None else _vec(gamma, "gamma", c)
    b = np.zeros(c) if beta is None else _vec(beta, "beta", c)
    for name, value in (("gamma", g), ("beta", b), ("mean", mu)):
        if not np.isfinite(value).all():
            ch = np.flatnonzero(~np.isfinite(value))[:5].tolist()
            raise ValueError(f"{name} must be finite; it is NaN or infinite in channel(s) {ch}")
    denom = v + float(eps)
    bad = ~(np.isfinite(denom) & (denom > 0))
    if bad.any():
        ch = np.flatnonzero(bad)[:5].tolist()
        raise ValueError(f"var + eps must be positive and finite; it is not for channel(s) {ch}")
    s = g / np.sqrt(denom)
    t = b - s * mu
    return s, t


# ----------------------------------------------------------------------------- backward folds


def fold_conv(weight: Any, bias: Any, s: Any, t: Any) -> tuple[np.ndarray, np.ndarray]:
    """Fold BN into a Conv: weight ``(C_out, C_in/groups, k...)``, bias ``(C_out,)`` or None.

    Any rank and any group count: output channel o is ``weight[o]`` in every case.
    Returns ``(W', b')`` with ``W' = W * s`` along axis 0 and ``b' = s*b + t``.
    """
    w = np.asarray(weight)
    if w.ndim < 3:
        raise ValueError(f"Conv weight must have rank >= 3 (channels, channels, k...), got shape {w.shape}")
    c_out = w.shape[0]
    s64, t64 = _scale_shift(s, t, c_out, "the Conv (C_out)")
    b = _bias_or_zeros(bias, c_out)
    # one fused pass: the weight is read in its own dtype and multiplied in float64
    return np.multiply(w, _along(s64, 0, w.ndim), dtype=np.float64), s64 * b + t64


def fold_conv_transpose(weight: Any, bias: Any, s: Any, t: Any, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Fold BN into a ConvTranspose: weight ``(C_in, C_out/groups, k...)``, bias ``(C_out,)``.

    Output channel ``g*(C_out/groups) + j`` uses ``W[g*C_in/groups:(g+1)*C_in/groups, j]``, so
    W is viewed as ``(groups, C_in/groups, C_out/groups, k...)`` and axis 2 is scaled by
    ``s.reshape(groups, C_out/groups)``. Returns ``(W', b')`` with ``b' = s*b + t``.
    """
    w = _conv_weight(weight, "ConvTranspose")
    c_in, cout_g, kernel = w.shape[0], w.shape[1], w.shape[2:]
    g = _groups_of(groups, c_in, "C_in")
    c_out = g * cout_g
    s64, t64 = _scale_shift(s, t, c_out, f"the ConvTranspose (C_out = groups*{cout_g})")
    b = _bias_or_zeros(bias, c_out)
    w5 = w.reshape((g, c_in // g, cout_g) + kernel)
    scale = s64.reshape((g, 1, cout_g) + (1,) * len(kernel))
    return (w5 * scale).reshape(w.shape), s64 * b + t64


def fold_gemm(
    b_matrix: Any, c: Any, s: Any, t: Any, *, trans_b: bool, alpha: float, beta: float, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Fold BN (on the N output columns) into ``Y = alpha * A @ op(B) + beta * C``.

    ``b_matrix`` is ``(K, N)``, or ``(N, K)`` when ``trans_b``; it keeps its layout. Returns
    ``(B', C')`` for a node with the same alpha and transA/transB and **beta = 1**:
    ``B'`` scales the N axis by s and ``C' = beta * s * C + t`` of shape ``(N,)``. C may be
    None, a scalar, or of shape (1,), (N,), (1, N); a per-row C ((M, N) or (M, 1) with M > 1)
    raises ValueError (not foldable). ``alpha`` is accepted for the record and not used: the
    fold scales B, and alpha multiplies the scaled product unchanged.
    """
    del alpha  # unchanged by the fold
    bm = _f64(b_matrix, "B")
    if bm.ndim != 2:
        raise ValueError(f"Gemm B must be 2-D, got shape {bm.shape}")
    axis = 0 if trans_b else 1
    if bm.shape[axis] != n:
        raise ValueError(
            f"Gemm B of shape {bm.shape} (transB={int(bool(trans_b))}) has {bm.shape[axis]} output columns,"
            f" expected N={n}"
        )
    s64, t64 = _scale_shift(s, t, n, "the Gemm (N)")
    c_vec = np.zeros(n) if c is None else _to_vector(c, n, "Gemm C")
    return bm * _along(s64, axis, 2), float(beta) * s64 * c_vec + t64


def fold_matmul(weight: Any, bias: Any, s: Any, t: Any) -> tuple[np.ndarray, np.ndarray]:
    """Fold BN into ``x @ W (+ bias)`` with constant ``W`` of shape ``(K, N)``.

    ``bias`` (from a following Add) is None, a scalar, or any shape broadcastable to (N,) whose
    leading dims are 1 ((1,), (N,), (1, N)). Returns ``(W * s along axis 1, s*bias + t)``, the
    latter of shape (N,).
    """
    w = _f64(weight, "weight")
    if w.ndim != 2:
        raise ValueError(f"MatMul weight must be 2-D (K, N), got shape {w.shape}")
    n = w.shape[1]
    s64, t64 = _scale_shift(s, t, n, "the MatMul (N)")
    b = np.zeros(n) if bias is None else _to_vector(bias, n, "MatMul bias")
    return w * _along(s64, 1, 2), s64 * b + t64


# ----------------------------------------------------------------------------- forward fold


def fold_forward_conv(weight: Any, bias: Any, s: Any, t: Any, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Fold a BN on the Conv's *input* channels into that (unpadded) Conv (docs/math.md section 4).

    ``weight`` is ``(C_out, C_in/groups, k...)``; ``s``, ``t`` have length ``C_in``. Input
    channel j of output channel o (in group ``gi = o // (C_out/groups)``) is ``gi*(C_in/groups)+j``.
    Returns ``W'[o, j, k] = W[o, j, k] * s[gi*(C_in/groups)+j]`` and
    ``b'[o] = b[o] + sum_{j,k} W[o, j, k] * t[gi*(C_in/groups)+j]``. Exact only when the Conv
    pads nothing; the caller must check that.
    """
    w = _conv_weight(weight, "Conv")
    c_out, cin_g = w.shape[0], w.shape[1]
    g = _groups_of(groups, c_out, "C_out")
    c_in = g * cin_g
    s64, t64 = _scale_shift(s, t, c_in, f"the Conv input (C_in = groups*{cin_g})")
    b = _bias_or_zeros(bias, c_out)
    group_of_out = np.arange(c_out) // (c_out // g)
    idx = group_of_out[:, None] * cin_g + np.arange(cin_g)[None, :]  # (C_out, C_in/groups)
    extra = (1,) * (w.ndim - 2)
    s_oj = s64[idx].reshape(idx.shape + extra)
    t_oj = t64[idx].reshape(idx.shape + extra)
    b_new = b + (w * t_oj).reshape(c_out, -1).sum(axis=1)
    return w * s_oj, b_new


# ----------------------------------------------------------------------------- cast back


class FoldValueError(ValueError):
    """A folded value is not representable in the target dtype.

    ``kind`` is ``'overflow'`` (a value is or becomes inf/nan) or ``'underflow'`` (a nonzero
    value becomes zero or subnormal where the original was a normal number).
    """

    def __init__(self, kind: str, message: str | None = None) -> None:
        if kind not in ("overflow", "underflow"):
            raise ValueError(f"FoldValueError kind must be 'overflow' or 'underflow', got {kind!r}")
        self.kind = kind
        super().__init__(message or kind)


def _resolve_dtype(dtype: Any) -> np.dtype:
    if isinstance(dtype, str) and dtype.lower() == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:  # pragma: no cover - depends on the environment
            raise ValueError("bfloat16 needs the ml_dtypes package") from None
        return np.dtype(ml_dtypes.bfloat16)
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise ValueError(f"unsupported dtype {dtype!r}: {exc}") from None
    if dt.name not in ("float16", "bfloat16", "float32", "float64"):
        raise ValueError(f"cast_back supports float16, bfloat16, float32 and float64, not {dt.name}")
    return dt


# (max, smallest normal) of the dtypes with a fast path in cast_back
_LIMITS = {
    np.dtype(t): (float(np.finfo(t).max), float(np.finfo(t).tiny))
    for t in (np.float16, np.float32, np.float64)
}


_CHUNK = 1 << 18


def _abs_range(a: np.ndarray) -> tuple[float, float]:
    """(min |a|, max |a|) in cache-sized chunks: no array-sized temporary (NaN propagates)."""
    flat = a.reshape(-1)
    if flat.size <= _CHUNK:
        part = np.abs(flat)
        return float(part.min()), float(part.max())  # NaN propagates through max
    buf = np.empty(_CHUNK, dtype=a.dtype)
    lo, hi = np.inf, 0.0
    for i in range(0, flat.size, _CHUNK):
        part = np.abs(flat[i:i + _CHUNK], out=buf[: min(_CHUNK, flat.size - i)])
        top = float(part.max())
        if top != top:  # NaN: the slow path reports it
            return lo, top
        lo, hi = min(lo, float(part.min())), max(hi, top)
    return lo, hi


def fold_conv_cast(weight: Any, bias: Any, s: Any, t: Any) -> tuple[np.ndarray, np.ndarray]:
    """``fold_conv`` then ``cast_back`` of ``W'`` (to the weight's dtype) and ``b'`` (to the
    bias's, or the weight's if there is none): the same values and the same errors.

    A large weight is scaled a block of output channels at a time, each block multiplied in
    float64 and cast while it is in cache, so no float64 copy of the whole weight exists (half
    the memory traffic, and no weight-sized temporary).
    """
    w = np.asarray(weight)
    w_out = None
    if w.ndim >= 3 and w.dtype in _LIMITS and w.size > _CHUNK and w.shape[0]:
        c_out = w.shape[0]
        s64, t64 = _scale_shift(s, t, c_out, "the Conv (C_out)")
        b2 = s64 * _bias_or_zeros(bias, c_out) + t64
        w_out = _scale_rows_cast(w.reshape(c_out, -1), s64)
    if w_out is None:
        w2, b2 = fold_conv(w, bias, s, t)
        w_out = cast_back(w2, w.dtype, original=w)
        del w2
    b = None if bias is None else np.asarray(bias)
    b_orig = b.reshape(b2.shape) if b is not None and b.size == b2.size else np.zeros_like(b2)
    return w_out.reshape(w.shape), cast_back(b2, b.dtype if b is not None else w.dtype, original=b_orig)


# rows per block in ``_scale_rows_cast``: about this many values (float64: 256 KiB, in cache)
_BLOCK = 1 << 15


def _scale_rows_cast(rows: np.ndarray, s64: np.ndarray) -> np.ndarray | None:
    """``cast_back(rows * s64[:, None], rows.dtype, original=rows)`` block by block; None if some
    value does not fit (the caller then computes the whole array, and its error names every value).

    Each block is multiplied into one reused float64 buffer and cast into the result while it is
    in cache: a single weight-sized allocation, the result.
    """
    dt = rows.dtype
    top, tiny = _LIMITS[dt]
    n, k = rows.shape
    out = np.empty(rows.shape, dtype=dt)
    per = max(1, _BLOCK // max(k, 1))
    buf = np.empty((min(per, n), k), dtype=np.float64)
    mag = np.empty((min(per, n), k), dtype=dt)
    scale = s64[:, None]
    with np.errstate(over="ignore", under="ignore"):
        for i in range(0, n, per):
            j = min(n, i + per)
            block, dest, a = buf[: j - i], out[i:j], mag[: j - i]
            np.multiply(rows[i:j], scale[i:j], out=block)
            np.copyto(dest, block, casting="unsafe")
            np.abs(dest, out=a)
            hi = a.max()
            if hi <= top and a.min() >= tiny:  # NaN fails the first test
                continue
            try:  # zeros, or a real problem: the element-wise checks on this block alone
                dest[...] = cast_back(block, dt, original=rows[i:j])
            except FoldValueError:
                return None
    return out


def _tiny(dt: np.dtype) -> float:
    """Smallest positive normal number of ``dt``."""
    if dt.name == "bfloat16":
        import ml_dtypes

        return float(ml_dtypes.finfo(dt).tiny)
    return float(np.finfo(dt).tiny)


def cast_back(value64: Any, dtype: Any, original: Any = None) -> np.ndarray:
    """Cast a float64 fold result to ``dtype`` (float16, bfloat16 via ml_dtypes, float32, float64).

    Raises ``FoldValueError('overflow')`` if any value of ``value64`` is not finite or a finite
    one becomes inf. Raises ``FoldValueError('underflow')`` if a nonzero value becomes zero or
    subnormal in ``dtype`` while the corresponding ``original`` value (same shape) was a normal
    number of ``dtype``; zero and subnormal originals do not count. Without ``original``, every
    nonzero value that becomes zero or subnormal counts. Returns a new C-contiguous array.
    """
    v = value64 if type(value64) is np.ndarray and value64.dtype == np.float64 else _f64(value64, "value64")
    limits = _LIMITS.get(dtype) if isinstance(dtype, np.dtype) else None
    dt = dtype if limits is not None else _resolve_dtype(dtype)
    if original is not None and np.shape(original) != v.shape:
        raise ValueError(f"original has shape {np.shape(original)}, value has shape {v.shape}")
    if limits is not None and v.size:
        # fast path: if every cast magnitude is finite and at least the smallest normal number,
        # nothing overflowed or turned subnormal, and the element-wise checks below are not needed
        with np.errstate(over="ignore", under="ignore"):
            out = v.astype(dt)
        lo, hi = _abs_range(out)
        if hi <= limits[0] and lo >= limits[1]:
            return out
    if not np.isfinite(v).all():
        bad = int((~np.isfinite(v)).sum())
        raise FoldValueError("overflow", f"{bad} folded value(s) are not finite (inf or nan)")
    with np.errstate(over="ignore", under="ignore"):
        out = np.ascontiguousarray(v.astype(dt))
    back = out.astype(np.float64)
    over = ~np.isfinite(back)
    if over.any():
        worst = float(np.abs(v[over]).max())
        raise FoldValueError(
            "overflow", f"{int(over.sum())} folded value(s) overflow {dt.name} (largest |value| {worst:.6g})"
        )
    tiny = _tiny(dt)
    lost = (v != 0) & (np.abs(back) < tiny)
    if original is not None:
        orig = _f64(original, "original")
        if orig.shape != v.shape:
            raise ValueError(f"original has shape {orig.shape}, value has shape {v.shape}")
        lost &= np.abs(orig) >= tiny
    if lost.any():
        smallest = float(np.abs(v[lost]).min())
        raise FoldValueError(
            "underflow",
            f"{int(lost.sum())} folded value(s) become zero or subnormal in {dt.name}"
            f" (smallest |value| {smallest:.3g})",
        )
    return out
