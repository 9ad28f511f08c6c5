"""Per-channel mean and biased variance of one CPU batch, for the training network's BN.

Calibration runs every BN module on a batch and needs that batch's per-channel moments before it
can normalise (docs/math.md section 2: float64, never a float32 ``E[x^2] - E[x]^2`` that loses the
digits of a large offset). On the CPU the cost of the moments is what calibration adds to a plain
forward, so the common case reads the activation as few times as it can and writes nothing.

**Small contiguous float32 batches** (at most :data:`KERNEL_MAX` values, with a spatial size)
take none of the paths below: one call of torch's own BN kernel gives the normalised output and
the moments, its sums being float64 there (:func:`kernel_moments`; checked once per process by
:func:`kernel_moments_exact`). On them a few reductions and numpy steps per call cost more than
the arithmetic.

**With numba** (:mod:`bnfold.torch.kernels`, opt-in with ``BNFOLD_NUMBA=1``: its import costs a
one-shot process more than it saves) one pass adds
each value and its square in float64: rows of one sample and channel for a contiguous batch,
columns for an (N, C) or channels-last one; long channels as several rows of at most ``ROW``
values, long columns as sums of partial sums (see the kernels). Squares of float32 values are
exact in float64, so the raw ``E[x^2] - mean^2`` loses only the float64 rounding of the sums (at
most ``kernels.row_adds``/``column_adds`` times 2^-53 of ``E[x^2]``) times ``E[x^2] / var``;
:func:`float64_sums_limit` keeps that under ``TARGET[dtype]`` (2^-24 of the variance for
float32, 2^-40 for float64): about ``E[x^2] <= 2e5 var`` for float32 rows of
1024 values, a mean 400 standard deviations off (a float64 batch is centred from a mean ~1.5
standard deviations off). Channels past it are centred as below. Any other layout takes
:func:`strided_moments`.

**Without numba** (the default) torch's reductions read the activation twice, in
its dtype:

* **raw sums** (:func:`row_sums`): the NC... activation is viewed as rows of at most ``ROW``
  contiguous values of one channel; torch reduces each row in float32 (``sum`` and the L2
  ``vector_norm``, both vectorised over the contiguous row), and the per-row results are added
  per channel in float64. A short row keeps the float32 rounding of each partial sum near one
  ulp (measured: at most 3.2e-7 relative for rows of 1024, 1.3e-6 for rows of 50176).
* **the cancellation test**: ``var = E[x^2] - mean^2`` loses about ``E[x^2] / var`` ulps of the
  sum of squares. A channel keeps it where ``E[x^2] <= CANCEL[dtype] * var``, 8 for both dtypes
  (for float32 at most ~8 * 3.2e-7 = 2.6e-6 relative, inside the 64-ulp tolerance of the tests;
  torch's float64 row sums round alike, relative to float64's ulp: up to stop 22 float64 kept raw
  sums up to 1e6, and a mean 8-1000 spreads off lost up to 3e4 times that tolerance), else
* **centred sums** for the failing channels only: their values minus this batch's mean (known
  accurately from the raw sums) are copied into a reused scratch buffer and the same row
  reductions give ``d = mean(x - k)`` and ``q = mean((x - k)^2)``; ``mean = k + d`` and
  ``var = q - d^2`` with ``|d|`` tiny against the spread, so nothing cancels. A trained network
  has a few such channels in many layers (a large mean against a small spread); centring the
  whole activation for them would cost a write of all of it.

A channels-last activation (C innermost: ``channels_last`` memory format, or a permuted view) is
the (N * spatial, C) matrix :func:`channels_last_view`; :func:`column_sums` reduces blocks of its
rows across the contiguous channels, the same test and centring follow. Activations in any other
layout, or whose spatial size is too small for rows to pay, take :func:`strided_moments`: a
shifted two-pass with torch's reductions over the batch and spatial dimensions.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from bnfold.torch import kernels

__all__ = ["CANCEL", "CANCEL_FLOAT64_SUMS", "KERNEL_CANCEL", "KERNEL_MAX", "ROW", "Scratch", "TARGET",
           "cancel_limit", "channels_last_view", "column_sums", "cpu_batch_moments", "float64_sums_limit",
           "kernel_moments", "kernel_moments_exact", "row_length", "row_sums", "strided_moments", "use_kernel_moments"]

ROW = 1024  # longest row of one float32 reduction
_MIN_ROW = 64  # a shorter divisor than this makes too many rows: one row per channel and sample instead
_MIN_SPATIAL = 16  # below this (e.g. BatchNorm1d on (N, C)) the strided path is as fast
_BLOCK = 256  # rows of a channels-last activation reduced together in its dtype
_MIN_BLOCK = 8
CANCEL = {torch.float32: 8.0, torch.float64: 8.0}  # largest E[x^2] / var taken from torch's raw sums
CANCEL_FLOAT64_SUMS = 1e6  # the most taken from the kernels' float64 sums (float64_sums_limit)
TARGET = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -40}  # variance error allowed to raw float64 sums
_REFINE = 3  # passes of the centred sums at most (a second one is needed only past ~1e6 sigma)


class Scratch:
    """One reusable buffer per (device, dtype) for centred activations.

    BN modules run one after another, so one buffer as large as the largest BN input serves all
    of them; reusing it avoids the page faults of a fresh allocation per call, which cost more
    than the arithmetic.
    """

    def __init__(self) -> None:
        self._bufs: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def take(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A contiguous tensor of ``shape`` on the shared buffer (its contents are garbage)."""
        key = (device, dtype)
        buf = self._bufs.get(key)
        n = math.prod(shape)
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=dtype, device=device)
            self._bufs[key] = buf
        return buf[:n].view(shape)

    def like(self, x: torch.Tensor) -> torch.Tensor:
        return self.take(x.shape, x.dtype, x.device)


def row_length(spatial: int, row: int = ROW, minimum: int = _MIN_ROW) -> int:
    """The row length for a channel's ``spatial`` contiguous values: ``spatial`` itself when it is
    at most ``row``, else its largest divisor up to ``row`` (if that is at least ``minimum``; an
    awkward size, such as twice a large prime, keeps whole rows)."""
    if spatial <= row:
        return spatial
    for d in range(row, minimum - 1, -1):
        if spatial % d == 0:
            return d
    return spatial


def row_sums(x: torch.Tensor, length: int, squares: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-channel float64 sum and (if ``squares``) sum of squares of an NC...-contiguous CPU ``x``.

    Rows of ``length`` values (a divisor of the spatial size) are reduced by torch in ``x``'s
    dtype, both into one (2, rows) result; the per-row results (a few per channel and sample)
    are added per channel in float64 by numpy, whose per-call cost on such small arrays is a
    fraction of torch's.
    """
    n, c = x.shape[0], x.shape[1]
    rows = x.view(-1, length)
    if not squares:
        return _per_channel(rows.sum(1).numpy().astype(np.float64)[None], n, c)[0], None
    out = torch.empty((2, rows.shape[0]), dtype=x.dtype)
    torch.sum(rows, 1, out=out[0])
    torch.linalg.vector_norm(rows, 2, 1, out=out[1])
    both = out.numpy().astype(np.float64)
    np.square(both[1], out=both[1])
    s, q = _per_channel(both, n, c)
    return s, q


def _per_channel(v: np.ndarray, n: int, c: int) -> np.ndarray:
    """``v`` (j, rows), its rows laid out (n, c, k): summed over the samples and the k rows of
    each channel, as (j, c). Contiguous reductions only: numpy's ``sum(axis=(0, 2), dtype=...)``
    is several times slower on these sizes."""
    per = v.reshape(v.shape[0], n, -1).sum(axis=1)
    return per if per.shape[1] == c else per.reshape(v.shape[0], c, -1).sum(axis=2)


def column_sums(x2: torch.Tensor, length: int, squares_out: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel float64 sum and sum of squares of a channels-last activation ``x2`` (R, C).

    Blocks of ``length`` rows (a divisor of R) are reduced by torch in ``x2``'s dtype, vectorised
    across the contiguous channels; the squares are written to ``squares_out`` (a scratch buffer,
    or ``x2`` itself when it may be overwritten): no torch reduction of squares over a non-last
    dimension reads without writing (``vector_norm`` over it is 5-10x slower).
    """
    c = x2.shape[1]
    s = x2.view(-1, length, c).sum(1).numpy().sum(axis=0, dtype=np.float64)
    sq = torch.mul(x2, x2, out=squares_out).view(-1, length, c).sum(1)
    return s, sq.numpy().sum(axis=0, dtype=np.float64)


def channels_last_view(x: torch.Tensor) -> torch.Tensor | None:
    """``x`` (N, C, ...) as a contiguous (N * spatial, C) view where its memory is channels-last."""
    if x.dim() < 3:
        return None
    p = x.permute(0, *range(2, x.dim()), 1)
    return p.view(-1, x.shape[1]) if p.is_contiguous() else None


Sums = Callable[[torch.Tensor, bool], tuple[np.ndarray, np.ndarray]]


def float64_sums_limit(dtype: torch.dtype, adds: int) -> float:
    """The largest ``E[x^2] / var`` taken from float64 sums with ``adds`` sequential additions
    (:func:`bnfold.torch.kernels.row_adds`, ``column_adds``): the variance then loses at most
    ``3 * adds * 2^-53 * E[x^2] / var`` of itself (sum of squares, and twice the mean's share),
    kept under ``TARGET[dtype]``; at most ``CANCEL_FLOAT64_SUMS``. A float64 batch's squares and
    sums round relative to its own ulp, whose 64-ulp tolerance that bound (2^-40) does not keep:
    (N, C) columns of 64-256 values lost up to 152 ulps at ``E[x^2] / var`` 16-100 (review23),
    so it takes raw sums no further than the torch path does (``CANCEL[torch.float64]``)."""
    limit = min(CANCEL_FLOAT64_SUMS, TARGET[dtype] / (3 * adds * 2.0 ** -53))
    return min(limit, CANCEL[torch.float64]) if dtype == torch.float64 else limit


def cancel_limit(x: torch.Tensor) -> float | None:
    """The largest ``E[x^2] / var`` that :func:`cpu_batch_moments` takes from raw sums for the
    batch ``x`` on the path in use; None where it takes the strided two-pass (no raw sums)."""
    layout = _kernel_layout(x) if kernels.enabled() else _torch_layout(x, Scratch())
    return None if layout is None else layout[2]


def cpu_batch_moments(x: torch.Tensor, scratch: Scratch) -> tuple[np.ndarray, np.ndarray, int]:
    """``(mean, biased var, centred)`` of a float32/float64 CPU batch ``x`` (N, C, ...).

    ``mean`` and ``var`` are float64 numpy arrays, one value per channel; ``centred`` counts the
    channels whose raw sums failed the cancellation test and were recomputed from centred values
    (0 on the strided path). See the module docstring for the method.
    """
    x = x.detach()  # an input that requires grad (the data itself, into a first BN) has no numpy()
    layout = _kernel_layout(x) if kernels.enabled() else _torch_layout(x, scratch)
    if layout is None:  # another layout, or an awkward size: the strided two-pass
        mean_t, var_t = strided_moments(x, scratch)
        return mean_t.numpy(), var_t.numpy(), 0
    view, sums, cancel = layout
    m = view.numel() // view.shape[1]
    s, q = sums(view, False)
    with np.errstate(invalid="ignore", over="ignore"):  # inf/nan activations: reported by the caller
        mean = s / m
        ex2 = q / m
        var = ex2 - mean * mean
        # nan fails the test too; an infinite E[x^2] (squares past the dtype's range) is redone
        # from centred values, which may well be in range
        bad = np.flatnonzero(~((ex2 <= cancel * var) & (ex2 < np.inf)))
        if bad.size:
            _centre(view, mean, var, None if bad.size == x.shape[1] else bad, sums, scratch)
        np.maximum(var, 0.0, out=var)
    return mean, var, int(bad.size)


def _kernel_layout(x: torch.Tensor) -> tuple[torch.Tensor, Sums, float] | None:
    """``x`` with its channels on dimension 1, the numba kernel that sums it per channel, and the
    cancellation limit those sums allow: rows of one sample and channel where ``x`` is
    contiguous, columns where it is (N, C) or channels-last; None for any other layout."""
    if x.dim() == 2 and x.is_contiguous():
        view = x
    elif x.is_contiguous():
        spatial = math.prod(x.shape[2:])
        length = row_length(spatial)

        def rows(t: torch.Tensor, owned: bool) -> tuple[np.ndarray, np.ndarray]:
            n, c = t.shape[0], t.shape[1]
            s, q = _per_channel(kernels.row_moments(t.view(-1, length).numpy()), n, c)
            return s, q
        adds = kernels.row_adds(length) + x.shape[0] + spatial // length  # + numpy's sums of the rows
        return x, rows, float64_sums_limit(x.dtype, adds)
    else:
        cl_view = channels_last_view(x)
        if cl_view is None:
            return None
        view = cl_view

    def columns(t: torch.Tensor, owned: bool) -> tuple[np.ndarray, np.ndarray]:
        s, q = kernels.column_moments(t.numpy())
        return s, q
    return view, columns, float64_sums_limit(x.dtype, kernels.column_adds(view.shape[0], kernels.parts()))


def _torch_layout(x: torch.Tensor, scratch: Scratch) -> tuple[torch.Tensor, Sums, float] | None:
    """As :func:`_kernel_layout` with torch's float32 reductions: rows of at most ``ROW`` values
    where ``x`` is contiguous, blocks of channels-last rows; None where the spatial size is too
    small for rows to pay, or no block length divides the row count."""
    spatial = math.prod(x.shape[2:])
    if spatial < _MIN_SPATIAL:
        return None
    cancel = CANCEL[x.dtype]
    if x.is_contiguous():
        length = row_length(spatial)

        def rows(t: torch.Tensor, owned: bool) -> tuple[np.ndarray, np.ndarray]:
            return row_sums(t, length)  # type: ignore[return-value]
        return x, rows, cancel
    view = channels_last_view(x)
    if view is None:
        return None
    block = row_length(view.shape[0], _BLOCK, _MIN_BLOCK)
    if block > ROW:  # an awkward row count: one long float32 sum per column
        return None

    def columns(t: torch.Tensor, owned: bool) -> tuple[np.ndarray, np.ndarray]:
        return column_sums(t, block, t if owned else scratch.take(t.shape, t.dtype, t.device))
    return view, columns, cancel


def _centre(x: torch.Tensor, mean: np.ndarray, var: np.ndarray, bad: np.ndarray | None, sums: Sums,
            scratch: Scratch) -> None:
    """Recompute ``mean``/``var`` of the ``bad`` channels (all where None) from ``x - k``, ``k``
    their mean in ``x``'s dtype, written to the scratch buffer (only those channels). ``x`` has
    its channels on dimension 1 (NC... rows, or the (R, C) channels-last view); ``sums`` is the
    layout's per-channel reduction, told that the centred tensor may be overwritten.

    Where ``k`` is still far from the mean against the spread (``16 d^2 > q``: the raw mean of a
    huge offset over a tiny spread is only good to ~1e-7 of the offset), ``k + d`` becomes the
    next shift, at most ``_REFINE`` times or until it stops changing (the dtype's last bit).
    """
    np_dtype = np.float32 if x.dtype == torch.float32 else np.float64
    bcast = (1, -1) + (1, ) * (x.dim() - 2)
    idx = None if bad is None else torch.from_numpy(bad)
    k = (mean if bad is None else mean[bad]).astype(np_dtype)
    for _ in range(_REFINE):
        kt = torch.from_numpy(k).view(bcast)
        if idx is None:
            z = torch.sub(x, kt, out=scratch.take(x.shape, x.dtype, x.device))
        else:
            shape = (x.shape[0], idx.numel(), *x.shape[2:])
            z = torch.index_select(x, 1, idx, out=scratch.take(shape, x.dtype, x.device)).sub_(kt)
        m = z.numel() // z.shape[1]
        d, q = sums(z, True)
        d /= m
        q /= m
        centred_mean = k.astype(np.float64) + d
        if not (16 * d * d > q).any():
            break
        k_next = centred_mean.astype(np_dtype)
        if np.array_equal(k_next, k):
            break
        k = k_next
    centred_var = q - d * d
    if bad is None:
        mean[:] = centred_mean
        var[:] = centred_var
    else:
        mean[bad] = centred_mean
        var[bad] = centred_var


def strided_moments(x: torch.Tensor, scratch: Scratch) -> tuple[torch.Tensor, torch.Tensor]:
    """Shifted two-pass moments over the batch and spatial dimensions of ``x`` in any layout.

    ``k = mean(x)`` in ``x``'s dtype, then ``d = mean(x - k)`` and ``q = mean((x - k)^2)`` with
    the centred values in the scratch buffer: ``mean = k + d``, ``var = q - d^2``.
    """
    dims = [0, *range(2, x.dim())]
    k = x.mean(dims)
    z = torch.sub(x, k.view((1, -1) + (1,) * (x.dim() - 2)), out=scratch.like(x))
    d = z.mean(dims).to(torch.float64)
    q = z.square_().mean(dims).to(torch.float64)
    return k.to(torch.float64) + d, (q - d * d).clamp_(min=0.0)


#: largest activation (values) whose moments come from torch's own BN kernel: below it the
#: kernel's one call beats :func:`cpu_batch_moments`' several reductions and numpy steps
#: (measured at batch 8: (8, 96, 8, 8) 57 us against 105 us; (8, 72, 16, 16) 148 against 123)
KERNEL_MAX = 100_000
_EXACT: bool | None = None  # kernel_moments_exact's verdict, once per process


def kernel_moments_exact() -> bool:
    """Whether torch's CPU BN kernel gives float64-exact batch moments for a contiguous
    (N, C, spatial > 1) float32 batch: sums in double (``acc_type<float>``), variance from values
    centred on the mean (two passes), so only the rounding of the results to float32 is lost: a
    mean within half an ulp, a variance within ~2^-22 of itself plus (half an ulp of the mean)^2 /
    var from centring on the rounded mean (:data:`KERNEL_CANCEL` bounds both). Not a documented
    property, so checked once per process on a batch whose float32 sums would round: 16384 values
    of 2^14 + k/8 per channel (float sums miss its mean by several ulps)."""
    global _EXACT
    if _EXACT is None:
        g = torch.Generator().manual_seed(0)
        with torch._C.DisableTorchFunction():  # bnfold's own draw: not the model's (training_graph's random check)
            k = torch.randint(-8, 9, (64, 4, 16, 16), generator=g).to(torch.float64) / 8
        x = (k + 2.0 ** 14).to(torch.float32)  # every value exact in float32
        mean = torch.zeros(4, dtype=torch.float32)  # not the default dtype (a float64 one: mixed dtypes refused)
        var = torch.ones(4, dtype=torch.float32)
        with torch.no_grad(), torch._C.DisableTorchFunction():  # bnfold's own call, not the user's modes'
            torch.nn.functional.batch_norm(x, mean, var, None, None, True, 1.0, 1e-5)
        x64 = x.to(torch.float64)
        true_mean = x64.mean((0, 2, 3))
        true_var = x64.var((0, 2, 3), correction=1)
        _EXACT = bool(torch.all((mean.to(torch.float64) - true_mean).abs() <= 2.0 ** -10)  # half an ulp at 2^14
                      and torch.all((var.to(torch.float64) - true_var).abs() <= 1e-5 * true_var))
    return _EXACT

#: largest mean^2 / var of a channel taken from the kernel: its mean is rounded to float32, half an
#: ulp of the mean, at most 2^-20 of the spread here (8 ulps of the deviations, where the tests
#: allow 64); past it the channel's moments are recomputed in float64 (:func:`kernel_moments`)
KERNEL_CANCEL = 2.0 ** 8


def kernel_moments(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                   scratch: Scratch) -> tuple[torch.Tensor, np.ndarray, np.ndarray] | None:
    """The training BN of a small CPU batch (:func:`use_kernel_moments`): ``(y, mean, biased var)``,
    ``y`` from torch's BN kernel with the batch statistics, the moments (float64 numpy) from the
    same call, throw-away running buffers with momentum 1 receiving the mean and the unbiased
    variance. Channels whose mean is far off against their spread (:data:`KERNEL_CANCEL`) get
    theirs from :func:`strided_moments` over their values. None where a variance is not finite:
    the kernel's ``var_sum`` is float32, inf once m * var passes float32's range (var itself far
    inside it), and its ``y`` normalised with that; the caller takes :func:`cpu_batch_moments`
    (inf/nan activations are reported from there)."""
    c = x.shape[1]
    m = x.numel() // c
    mean_t = torch.zeros(c, dtype=x.dtype)
    var_t = torch.ones(c, dtype=x.dtype)
    y = torch.nn.functional.batch_norm(x, mean_t, var_t, weight, bias, True, 1.0, eps)
    var = var_t.numpy().astype(np.float64)
    if not np.isfinite(var).all():
        return None
    var *= (m - 1) / m
    mean = mean_t.numpy().astype(np.float64)  # finite: the variance is (float32 values squared cannot overflow)
    far = np.flatnonzero(mean * mean > KERNEL_CANCEL * var)
    if far.size:
        far_mean, far_var = strided_moments(x.detach().index_select(1, torch.from_numpy(far)), scratch)
        mean[far] = far_mean.numpy()
        var[far] = far_var.numpy()
    return y, mean, var


def use_kernel_moments(x: torch.Tensor) -> bool:
    """Whether the batch ``x`` (CPU float32/float64) takes its moments from torch's BN kernel: a
    small contiguous float32 activation with a spatial size (a (N, C) batch goes to the kernel's
    channels-last code, which sums in float), where :func:`kernel_moments_exact` holds. Not float64:
    there the kernel's sums are plain double sums, with no wider type to hide their rounding (its
    mean misses a long-double reference by several times the tolerance of the tests at
    (8, 32, 16, 16) and 8 spreads of offset), where :func:`cpu_batch_moments` keeps the digits."""
    return (x.dtype == torch.float32 and x.numel() <= KERNEL_MAX and x.dim() > 2 and x.is_contiguous()
            and x.numel() > x.shape[0] * x.shape[1]
            and kernel_moments_exact())
