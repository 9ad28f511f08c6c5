"""One-pass float64 sums and sums of squares of a CPU activation, compiled by numba.

torch has no CPU reduction that returns a row's sum and sum of squares from one read (``var_mean``
is a slow Welford, the training BN kernel writes its output), so the plain-torch moments read
each BN input twice (``sum``, then ``vector_norm``) in float32. These kernels read it once and
add in float64: the square of a float32 value is exact in float64, so ``E[x^2] - mean^2`` loses
only what the ratio ``E[x^2] / var`` costs of ~1e-16, and the centring pass of
:mod:`bnfold.torch.moments` is left to offsets of a thousand standard deviations and more.

* :func:`row_moments`: (R, L) C-contiguous rows (one per sample and channel of an NC... batch)
  -> (2, R) float64 sums and sums of squares, rows split among the threads;
* :func:`column_moments`: an (R, C) C-contiguous matrix (a channels-last batch) -> (2, C), each
  thread adding a block of rows across the contiguous channels.

The kernels are compiled on first use (about a second per dtype, cached on disk where numba can
write its cache) and run on as many threads as torch uses. They are not used, and the caller
falls back to torch, where numba is not installed, ``BNFOLD_NUMBA=0`` is set, numba found no
OpenMP or TBB threading layer (its ``workqueue`` fallback was measured slower than torch), or in
a process forked after the kernels ran (GNU OpenMP is not fork-safe: numba stops such a child).
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

__all__ = ["ENV", "column_moments", "enabled", "reason_disabled", "row_moments"]

ENV = "BNFOLD_NUMBA"  # "0": never use the kernels (the plain-torch moments instead)

# reassoc lets LLVM vectorise the float64 sums; no "nnan"/"ninf", so inf and nan still propagate
_FASTMATH = {"reassoc", "contract"}
_state: dict[str, Any] = {}


def _compile() -> dict[str, Any]:
    import numba

    def jit(fn: Any) -> Any:
        try:
            return numba.njit(parallel=True, fastmath=_FASTMATH, boundscheck=False, cache=True)(fn)
        except Exception:  # no writable cache location: compile in every process instead
            return numba.njit(parallel=True, fastmath=_FASTMATH, boundscheck=False)(fn)

    def rows(a: np.ndarray, out: np.ndarray) -> None:
        for r in numba.prange(a.shape[0]):
            s = 0.0
            q = 0.0
            for j in range(a.shape[1]):
                v = np.float64(a[r, j])
                s += v
                q += v * v
            out[0, r] = s
            out[1, r] = q

    def columns(a: np.ndarray, out: np.ndarray) -> None:  # out: (parts, 2, C), zeros
        parts = out.shape[0]
        n = a.shape[0]
        for p in numba.prange(parts):
            s = out[p, 0]
            q = out[p, 1]
            r = n * p // parts
            end = n * (p + 1) // parts
            while r + 8 <= end:  # eight rows per visit of the accumulators: 2-4x faster than one
                for c in range(a.shape[1]):
                    t = 0.0
                    u = 0.0
                    for k in range(8):
                        v = np.float64(a[r + k, c])
                        t += v
                        u += v * v
                    s[c] += t
                    q[c] += u
                r += 8
            while r < end:
                for c in range(a.shape[1]):
                    v = np.float64(a[r, c])
                    s[c] += v
                    q[c] += v * v
                r += 1

    return {"numba": numba, "rows": jit(rows), "columns": jit(columns)}


def reason_disabled() -> str | None:
    """Why the kernels are not used in this process (None where they are)."""
    if os.environ.get(ENV, "1") == "0":
        return f"{ENV}=0"
    if "error" not in _state and "kernels" not in _state:
        try:
            kernels = _compile()
            probe = np.ones((4, 3), dtype=np.float32)
            kernels["rows"](probe, np.empty((2, 4)))
            layer = kernels["numba"].threading_layer()
        except Exception as e:  # numba missing or unusable with this numpy/Python
            _state["error"] = f"numba unavailable ({type(e).__name__}: {e})".splitlines()[0]
        else:
            if layer == "workqueue":
                _state["error"] = "numba has no OpenMP or TBB threading layer (workqueue is slower than torch)"
            else:
                _state.update(kernels=kernels, pid=os.getpid())
    if "error" in _state:
        return str(_state["error"])
    if os.getpid() != _state["pid"]:
        return "process forked after the numba kernels ran (GNU OpenMP is not fork-safe)"
    return None


def enabled() -> bool:
    """True where :func:`row_moments` and :func:`column_moments` may be called."""
    return reason_disabled() is None


def _kernels() -> dict[str, Any]:
    """The compiled kernels, on as many threads as torch uses (RuntimeError where disabled)."""
    if "kernels" not in _state:
        reason = reason_disabled()
        if reason is not None:
            raise RuntimeError(f"bnfold's numba kernels are not available: {reason}")
    kernels = _state["kernels"]
    numba = kernels["numba"]
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    return kernels


def row_moments(a: np.ndarray) -> np.ndarray:
    """(2, R) float64: each row's sum and sum of squares of a C-contiguous (R, L) float32/64 ``a``."""
    out = np.empty((2, a.shape[0]))
    _kernels()["rows"](a, out)
    return out


def column_moments(a: np.ndarray) -> np.ndarray:
    """(2, C) float64: each column's sum and sum of squares of a C-contiguous (R, C) float32/64 ``a``."""
    kernels = _kernels()
    parts = max(1, min(kernels["numba"].get_num_threads(), a.shape[0]))
    out = np.zeros((parts, 2, a.shape[1]))
    kernels["columns"](a, out)
    return out.sum(axis=0)
