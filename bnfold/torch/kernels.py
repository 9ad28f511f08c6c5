"""One-pass float64 sums and sums of squares of a CPU activation, compiled by numba.

torch has no CPU reduction that returns a row's sum and sum of squares from one read (``var_mean``
is a slow Welford, the training BN kernel writes its output), so the plain-torch moments read
each BN input twice (``sum``, then ``vector_norm``) in float32. These kernels read it once and
add in float64: the square of a float32 value is exact in float64, so ``E[x^2] - mean^2`` loses
only the ratio ``E[x^2] / var`` times the sums' float64 rounding, and the centring pass of
:mod:`bnfold.torch.moments` is left to means a few hundred standard deviations off (float32).

* :func:`row_moments`: (R, L) C-contiguous rows (one per sample and channel of an NC... batch)
  -> (2, R) float64 sums and sums of squares, rows split among the threads;
* :func:`column_moments`: an (R, C) C-contiguous matrix (a channels-last batch) -> (2, C), each
  thread adding a block of rows across the contiguous channels.

Long sums are split: rows are at most ~1024 values (the caller views a long channel as several
rows; numba does not vectorise a blocked inner loop inside ``prange``, measured 5-10x slower) and
columns are sums of partial sums of ``BLOCK`` rows. A single running float64 total over the four
million values of one 2048x2048 channel was measured 1.6e-11 off (relative), which a mean a
thousand standard deviations off turns into 1e-5 of the variance. :func:`row_adds` and
:func:`column_adds` bound the rounding for the caller's cancellation test.

The kernels are used only where asked for (``BNFOLD_NUMBA=1``): in a fresh process, importing
numba and loading its cached kernels costs about 0.5 s, while warm they were measured no faster
than torch's reductions (ResNet-50, 4 batches of 8x3x128x128, one thread: 1.33 s against 1.37 s
CPU, against 1.22 s for a plain eval forward; benchmarks/torch_one_shot.py), so for the commonest
use, one calibration per process, they were the slowest option (issue 16 point 4). Their gain is
float64 sums that leave fewer offset channels to the centring pass.

The kernels are compiled on first use (about a second per dtype, cached on disk where numba can
write its cache) and run on as many threads as torch uses. They are not used, and the caller
falls back to torch, where ``BNFOLD_NUMBA`` is not ``1``, numba is not installed, numba found no
OpenMP or TBB threading layer (its ``workqueue`` fallback was measured slower than torch), or in
a process forked after the kernels ran (GNU OpenMP is not fork-safe: numba stops such a child).
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

__all__ = ["BLOCK", "ENV", "column_adds", "column_moments", "enabled", "parts", "reason_disabled", "row_adds",
           "row_moments"]

ENV = "BNFOLD_NUMBA"  # "1": use the kernels; anything else (the default): the plain-torch moments

# reassoc lets LLVM vectorise the float64 sums; no "nnan"/"ninf", so inf and nan still propagate
_FASTMATH = {"reassoc", "contract"}
BLOCK = 1024  # rows of the matrix per partial sum in column_moments
_state: dict[str, Any] = {}


def _compile() -> dict[str, Any]:
    import numba

    def jit(fn: Any) -> Any:
        try:
            return numba.njit(parallel=True, fastmath=_FASTMATH, boundscheck=False, cache=True)(fn)
        except Exception:  # no writable cache location: compile in every process instead
            return numba.njit(parallel=True, fastmath=_FASTMATH, boundscheck=False)(fn)

    def rows(a: np.ndarray, out: np.ndarray) -> None:  # rows of at most ~BLOCK values (the caller's)
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
            bs = np.zeros(a.shape[1])
            bq = np.zeros(a.shape[1])
            r = n * p // parts
            end = n * (p + 1) // parts
            while r < end:
                stop = min(r + BLOCK, end)  # a block of rows into bs/bq, then into s/q
                while r + 8 <= stop:  # eight rows per visit of the accumulators: 2-4x faster than one
                    for c in range(a.shape[1]):
                        t = 0.0
                        u = 0.0
                        for k in range(8):
                            v = np.float64(a[r + k, c])
                            t += v
                            u += v * v
                        bs[c] += t
                        bq[c] += u
                    r += 8
                while r < stop:
                    for c in range(a.shape[1]):
                        v = np.float64(a[r, c])
                        bs[c] += v
                        bq[c] += v * v
                    r += 1
                for c in range(a.shape[1]):
                    s[c] += bs[c]
                    q[c] += bq[c]
                    bs[c] = 0.0
                    bq[c] = 0.0

    return {"numba": numba, "rows": jit(rows), "columns": jit(columns)}


def row_adds(length: int) -> int:
    """A bound on the float64 additions in one rounding chain of :func:`row_moments` over rows
    of ``length`` values: the relative rounding error of a row's sum of squares (of the sum of
    magnitudes, for the sum) is at most about this times 2^-53. The caller keeps rows short
    (``moments.row_length``); no credit is taken for vectorisation, which splits each chain into
    several shorter ones."""
    return length


def column_adds(rows: int, parts: int) -> int:
    """The same for :func:`column_moments` over ``rows`` rows on ``parts`` threads: groups of 8
    rows, then partial sums of ``BLOCK`` rows, then the thread's total, then the ``parts`` totals."""
    per_part = -(-rows // max(1, parts))
    return min(per_part, BLOCK) + -(-per_part // BLOCK) + parts


def reason_disabled() -> str | None:
    """Why the kernels are not used in this process (None where they are)."""
    value = os.environ.get(ENV)
    if value != "1":
        # not even imported: numba's import and kernel load cost more than they save per process
        return f"{ENV}={value}" if value is not None else f"{ENV} not set (the kernels are opt-in: {ENV}=1)"
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


def parts() -> int:
    """The threads the kernels run on: as many as torch uses, at most numba's ``NUMBA_NUM_THREADS``
    (call only where :func:`enabled`)."""
    numba = _state["kernels"]["numba"]
    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


def _kernels() -> dict[str, Any]:
    """The compiled kernels, on :func:`parts` threads (RuntimeError where disabled)."""
    if "kernels" not in _state:
        reason = reason_disabled()
        if reason is not None:
            raise RuntimeError(f"bnfold's numba kernels are not available: {reason}")
    kernels = _state["kernels"]
    kernels["numba"].set_num_threads(parts())
    return kernels


def row_moments(a: np.ndarray) -> np.ndarray:
    """(2, R) float64: each row's sum and sum of squares of a C-contiguous (R, L) float32/64 ``a``."""
    out = np.empty((2, a.shape[0]))
    _kernels()["rows"](a, out)
    return out


def column_moments(a: np.ndarray) -> np.ndarray:
    """(2, C) float64: each column's sum and sum of squares of a C-contiguous (R, C) float32/64 ``a``
    (the rows split among at most :func:`parts` threads)."""
    kernels = _kernels()
    out = np.zeros((max(1, min(parts(), a.shape[0])), 2, a.shape[1]))
    kernels["columns"](a, out)
    return out.sum(axis=0)
