"""Population statistics for the BatchNorm modules of a PyTorch module (docs/math.md section 2).

The *training network* of the BN paper: every BN module normalises each mini-batch with that
batch's statistics, upstream BNs included, while everything else (Dropout, stochastic depth, any
``self.training`` branch) stays in eval mode. ``torch.optim.swa_utils.update_bn`` puts the whole
model in train mode instead (Dropout on) and weighs a short last batch like a full one; fvcore's
PreciseBN keeps the biased pooled variance. Here:

* the BN's ``forward`` is replaced, for the run only, by one that normalises with the batch's
  statistics and hands the batch's per-channel mean and *biased* variance (on the CPU from
  :mod:`bnfold.torch.moments`, elsewhere from the training-mode BN kernel) to that BN's accumulator,
  which adds them to float64 device tensors (Algorithm 2's weighted sums and the pooled
  ``(count, mean, M2)`` merged with Chan's formula). The module's running buffers are never
  touched (no momentum, no ``num_batches_tracked`` update), and nothing is copied to the host
  per batch; the sums come back once, at the end. The replaced forward also counts the BN's
  calls, to check that it is called once per forward;
* timm's ``BatchNormAct2d`` (whose forward is that BN, then its ``drop``, then its ``act``; the fold
  relies on the same, :mod:`bnfold.torch.bn_kinds`) gets the same replaced forward followed by its
  ``drop`` and ``act``; any other BN-like module that overrides ``forward`` (a hand-written BN,
  mmcv's, ``SyncBatchNormAct``) is calibrated through its ``F.batch_norm`` call on its own buffers,
  caught by :mod:`bnfold.torch.intercept` and handled as above; one whose forward never makes that
  call is refused (``UnsupportedModelError``), never left stale. ``FrozenBatchNorm2d`` keeps its
  statistics (an affine by design);
* at the end the sums become :class:`bnfold.records.BnStats` and :func:`bnfold.formulas.stats.finalize`
  turns them into :class:`bnfold.records.FrozenStats`, exactly as on the ONNX path.

The returned module is in eval mode with the chosen estimator's statistics in ``running_mean`` /
``running_var``; a ``track_running_stats=False`` BN becomes a BN with running statistics.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast
from warnings import warn as _warn

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy

from bnfold.api_checks import check_callable
from bnfold.data.sources import CalibrationData
from bnfold.data.stream import StreamData, refuse_read_generator
from bnfold.distributed import RankShard, resolve_group
from bnfold.distributed.combine import RankGuard, decode_stats, encode_stats, merge_ranks
from bnfold.distributed.run_facts import RankFacts, combine_facts
from bnfold.errors import BadInputError, BnfoldError, BnfoldWarning, UnsupportedModelError, one_line
from bnfold.formulas.drift import drift as drift_of
from bnfold.formulas.drift import no_drift
from bnfold.formulas.stats import ESTIMATORS, GAP_WARNING, finalize, gap_warning, merge, update
from bnfold.formulas.sufficiency import DEFAULT_TARGET_SE, check_target_se, sufficiency_warning
from bnfold.records import BnStats, Drift, FrozenStats, Mode
from bnfold.torch.batches import Batch, check_arity, count_batches, iter_batches, tensors
from bnfold.torch.bn_kinds import BnKind, bn_kind, bn_like_modules, is_standard_bn
from bnfold.torch.device import check_device
from bnfold.torch.heap import release_heap, settle_heap
from bnfold.torch.intercept import BatchNormIntercept
from bnfold.torch.module_copy import DeferredCopy, copy_module, deferred_copy
from bnfold.torch.moments import Scratch, cpu_batch_moments, kernel_moments, use_kernel_moments
from bnfold.torch.training_graph import TRAINING_GRAPH_HINT, RandomDraws, training_time_forward
from bnfold.torch.wrappers import eager

__all__ = [
    "GAP_WARNING",
    "CalibrationRun",
    "RECALIBRATE",
    "TRAINING_NOTE",
    "calibrate",
    "drift",
    "copy_module",
    "find_batchnorms",
    "bn_mode",
    "is_standard_bn",
    "module_device",
    "run_calibration",
]


Progress = Callable[[int, "int | None"], None]

#: which BNs data re-estimates (``recalibrate=``): "training" = those that normalise with batch
#: statistics as the module stands (``train()`` or ``track_running_stats=False``), "all" = every BN
RECALIBRATE = ("training", "all")
TRAINING_NOTE = ("normalises with batch statistics (train() or track_running_stats=False): its running statistics "
                 "are not used, so there is nothing to compare")


# ----------------------------------------------------------------------------- module helpers


def find_batchnorms(module: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """Every ``_BatchNorm`` submodule once (an aliased module under its first name), in module order."""
    return [(name, m) for name, m in module.named_modules() if isinstance(m, _BatchNorm)]


def bn_mode(m: nn.Module) -> Mode:
    """TRAINING where the module normalises with batch statistics as it stands, else INFERENCE
    (any BN-like module: a hand-written one in train mode counts as TRAINING)."""
    if (m.training or not getattr(m, "track_running_stats", True) or getattr(m, "running_mean", None) is None
            or getattr(m, "running_var", None) is None):
        return Mode.TRAINING
    return Mode.INFERENCE


def spare_core() -> bool:
    """Whether this process has a core that torch's compute threads leave free, for the copy's
    background clones (:class:`bnfold.torch.module_copy.DeferredCopy`). Without one the thread only
    competes with the forward (2 cores, 2 torch threads: mobilenetv3_small_100's first batch 10-25 ms
    slower with it), and calibration makes a plain copy before the first forward instead."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    return torch.get_num_threads() < cores


def module_device(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


def float_dtype(module: nn.Module) -> torch.dtype:
    """The module's floating dtype (first floating parameter or buffer), for numpy batches."""
    for t in itertools.chain(module.parameters(), module.buffers()):  # lazily: a whole list costs ~2 ms
        if not is_lazy(t) and t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """The objects that exist before a calibration set aside from Python's cyclic collector while it
    runs (``gc.freeze``; ``gc.unfreeze`` after).

    Copying a module creates thousands of Python objects (a ResNet-50: ~10 000 dicts, modules and
    tensors), enough to start a full collection during the forward passes that follow, and a full
    collection walks every object of the process (torch's own are most of them): 40-80 ms here,
    more than the calibration adds to a forward pass (benchmarks/torch_one_shot.py). With the old
    objects frozen, a collection during the run walks only what the run made, and the collector
    still runs: cyclic garbage a model's forward makes batch after batch is freed as usual (turning
    the collector off instead let it pile up). A process that froze objects itself (``gc.freeze``
    before a fork) keeps them frozen: nothing is done then, nor with the collector off."""
    if not gc.isenabled() or gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def collect_young() -> None:
    """Called after each batch, for a collector switched off around the run (the CLI switches it off
    for the whole command, ``cli/gcpause.py``; a caller may too): what it would do at this point but
    the full (generation 2) pass, so that a forward that makes reference cycles (an object that
    refers to itself and holds an activation) does not grow memory with the number of batches
    (1000 batches of 0.5 MB cycles: 940 MB peak RSS against 407 MB, measured by review17b): a
    generation-0 collection once as many objects as its threshold were allocated, and every
    ``threshold1``-th of them one of generation 1. Cycles made by a forward pass (young objects)
    are freed batch by batch; the module copy's objects move to the old generations once and are
    not walked again. Nothing happens while the collector runs by itself (it keeps the count low),
    or when its threshold is 0 (collection switched off that way)."""
    threshold0, threshold1, _ = gc.get_threshold()
    if threshold0 <= 0 or gc.get_count()[0] < threshold0:
        return
    _YOUNG[0] += 1
    gc.collect(1 if threshold1 > 0 and _YOUNG[0] % threshold1 == 0 else 0)


_YOUNG = [0]  # generation-0 collections made by collect_young (every threshold1-th is of generation 1)


# ----------------------------------------------------------------------------- accumulation


@dataclass
class _DeviceSums:
    """Algorithm 2's sums of batch means and variances and the pooled mean and M2 of one BN,
    as float64 device tensors."""

    sum_mu: torch.Tensor
    sum_var: torch.Tensor
    pooled_mean: torch.Tensor
    pooled_m2: torch.Tensor
    mu_m2: torch.Tensor  # the batch-to-batch spread (docs/math.md 2.2): sum m_b (mu_b - E)^2
    var_mean: torch.Tensor  # running weighted mean of v_b = m_b sigma2_b / (m_b - 1), weight m_b - 1
    var_m2: torch.Tensor  # its M2


class _DeviceStats:
    """Algorithm 2's sums and the pooled (count, mean, M2) of one BN, as float64 device tensors.

    ``sum_m``/``sum_m1``/``batches`` are Python ints known from shapes: no device synchronisation.
    Moments computed on the host (the CPU path, numpy) go to ``host``, a :class:`BnStats` updated
    by the ONNX path's own :func:`bnfold.formulas.stats.update`; the two parts are merged at the end.
    """

    def __init__(self, name: str, scratch: Scratch | None = None) -> None:
        self.name = name
        self.scratch = scratch  # shared buffer of the CPU moments path
        self.channels: int | None = None
        self.batches = 0
        self.sum_m = 0
        self.sum_m1 = 0
        self.samples = 0  # sum N_b
        self.var_batches = 0  # batches with m_b >= 2
        self.sums: _DeviceSums | None = None
        self.host: BnStats | None = None

    def add(self, x: torch.Tensor) -> None:
        """Accumulate the batch ``x`` (used where the BN's own kernel cannot supply the moments)."""
        c = self._check(x)
        if c is None:
            return
        dims = [0, *range(2, x.dim())]
        x64 = x.detach().to(torch.float64)
        mu = x64.mean(dim=dims)
        var = (x64 - mu.view((1, c) + (1,) * (x.dim() - 2))).square_().mean(dim=dims)  # two-pass
        self.add_moments(mu, var, x.numel() // c, int(x.shape[0]))

    def _check(self, x: torch.Tensor) -> int | None:
        if x.dim() < 2:
            raise BadInputError(f"BN '{self.name}' got an input of shape {tuple(x.shape)}; expected (N, C, ...)")
        c = int(x.shape[1])
        if c == 0 or x.numel() == 0:
            return None  # an empty batch carries no statistics
        if self.channels is None:
            self.channels = c
        elif c != self.channels:
            raise BadInputError(f"BN '{self.name}' got {c} channels after {self.channels} in earlier batches")
        return c

    def add_moments(self, mu: torch.Tensor, var: torch.Tensor, m: int, n_b: int) -> None:
        """Add one batch's per-channel mean and biased variance (any float dtype) over m values
        of n_b samples. The same updates as :func:`bnfold.formulas.stats.update`, on the device."""
        mu, var = mu.to(torch.float64), var.to(torch.float64)
        n_a, w_a = self.sum_m, self.sum_m1
        n = n_a + m
        self.batches += 1
        self.samples += n_b
        self.sum_m = n
        self.sum_m1 += m - 1
        if m > 1:
            self.var_batches += 1
        s = self.sums
        if s is None:
            zero = torch.zeros_like(mu)
            v = var * (m / (m - 1)) if m > 1 else zero.clone()
            self.sums = _DeviceSums(sum_mu=mu * m, sum_var=var * m, pooled_mean=mu.clone(), pooled_m2=var * m,
                                    mu_m2=zero, var_mean=v, var_m2=zero.clone())
        else:
            s.sum_mu.add_(mu, alpha=m)
            s.sum_var.add_(var, alpha=m)
            delta = mu - s.pooled_mean
            s.pooled_mean.add_(delta, alpha=m / n)
            between = delta.square_().mul_(n_a * m / n)
            s.pooled_m2.add_(var, alpha=m).add_(between)
            s.mu_m2.add_(between)
            if m > 1:  # the unbiased batch variance, weight m - 1 (Chan's formula)
                w = w_a + m - 1
                d_v = torch.sub(var, s.var_mean, alpha=1.0).add_(var, alpha=1 / (m - 1))  # v_b - mean
                s.var_mean.add_(d_v, alpha=(m - 1) / w)
                s.var_m2.add_(d_v.square_(), alpha=w_a * (m - 1) / w)

    def add_host_moments(self, mu: np.ndarray, var: np.ndarray, m: int, n_b: int) -> None:
        """Add one batch's float64 numpy moments (the CPU path) over m values of n_b samples."""
        if self.host is None:
            self.host = BnStats(channels=int(mu.shape[0]))
        update(self.host, mu, var, m, n_b=n_b)

    def to_bnstats(self) -> BnStats:
        """One host copy of the sums, as the ONNX path's :class:`BnStats`."""
        s = self.sums
        if self.channels is None:
            return BnStats(channels=0)
        if s is None:
            return self.host if self.host is not None else BnStats(channels=0)
        host = torch.stack([s.sum_mu, s.sum_var, s.pooled_mean, s.pooled_m2, s.mu_m2, s.var_mean,
                            s.var_m2]).cpu().numpy()
        dev = BnStats(
            channels=self.channels, batches=self.batches, sum_m=self.sum_m, sum_m1=self.sum_m1,
            sum_mu=host[0].copy(), sum_var=host[1].copy(), pooled_mean=host[2].copy(), pooled_m2=host[3].copy(),
            samples=self.samples, var_batches=self.var_batches, mu_m2=host[4].copy(), var_mean=host[5].copy(),
            var_m2=host[6].copy(),
        )
        return dev if self.host is None else merge(self.host, dev)


def _check_eps(name: str, eps: float) -> None:
    """A BN to calibrate needs eps > 0: normalising with a batch's statistics divides by
    sqrt(var + eps), 0 in a channel whose batch is constant, and torch refuses eps <= 0 in training."""
    if not float(eps) > 0:
        raise BadInputError(
            f"BN '{name}' has eps={eps}: calibration normalises with each batch's statistics, which divides by zero in "
            "a channel whose batch variance is 0 (torch refuses eps <= 0 in training mode, update_bn too); set a "
            "positive eps before calibrating (e.g. bn.eps = 1e-5)")


def _batch_stat_forward(self: _BatchNorm, x: torch.Tensor, acc: _DeviceStats) -> torch.Tensor:
    """A standard BN module of the training network (see :func:`batch_stat_norm`)."""
    self._check_input_dim(x)
    return batch_stat_norm(x, self.weight, self.bias, self.eps, acc)


def batch_stat_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                    acc: _DeviceStats) -> torch.Tensor:
    """The BN of the training network: normalise with the batch's statistics, buffers untouched.

    On the CPU (float32/float64) the moments of a small contiguous float32 batch come with the output
    from one call of torch's BN kernel (``moments.kernel_moments``: its sums are float64 there; a
    variance it cannot hold sends the batch on); of any other, from ``moments.cpu_batch_moments``,
    and the normalisation from the inference kernel given those moments. Elsewhere they come from the BN
    kernel itself (one pass over the activation, as in training): with throw-away running
    buffers and momentum 1 it leaves the batch mean and the *unbiased* batch variance there; the
    biased variance is ``unbiased * (m - 1) / m``. Either way they go to this BN's accumulator
    ``acc``, and stay on the device.
    """
    c = x.shape[1] if x.dim() >= 2 else 0
    m = x.numel() // c if c else 0
    if c and m == 1:
        # one value per channel: (x - mean) = 0, so the output is beta; F.batch_norm refuses this
        acc.add(x)
        y = torch.zeros_like(x)
        if bias is not None:
            y = y + bias.to(x.dtype).view((1, c) + (1,) * (x.dim() - 2))
        return y
    if acc._check(x) is None:
        return F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and acc.scratch is not None:
        got = kernel_moments(x, weight, bias, eps, acc.scratch) if use_kernel_moments(x) else None
        if got is not None:  # a small float32 batch: one call of torch's BN kernel did it
            y, host_mean, host_var = got
            acc.add_host_moments(host_mean, host_var, m, int(x.shape[0]))
            return y
        host_mean, host_var, _ = cpu_batch_moments(x, acc.scratch)
        np_dtype = np.float32 if x.dtype == torch.float32 else np.float64
        y = F.batch_norm(x, torch.from_numpy(host_mean.astype(np_dtype)), torch.from_numpy(host_var.astype(np_dtype)),
                         weight, bias, False, 0.0, eps)
        acc.add_host_moments(host_mean, host_var, m, int(x.shape[0]))
        return y
    # float16/bfloat16: the kernel's mixed mode (float32 statistics and affine parameters, as
    # autocast runs it) keeps a batch variance past float16's 65504 and bfloat16's 8 bits
    stat_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    w = weight if weight is None else weight.to(stat_dtype)
    b = bias if bias is None else bias.to(stat_dtype)
    mean = torch.zeros(c, dtype=stat_dtype, device=x.device)
    var = torch.ones(c, dtype=stat_dtype, device=x.device)
    y = F.batch_norm(x, mean, var, w, b, True, 1.0, eps)
    acc.add_moments(mean, var.to(torch.float64) * ((m - 1) / m), m, int(x.shape[0]))
    return y


# ----------------------------------------------------------------------------- the run


@dataclass
class CalibrationRun:
    """What a calibration pass produced (``calibrate`` returns ``module`` and ``stats``)."""

    module: nn.Module
    stats: dict[str, FrozenStats]
    warnings: list[str] = field(default_factory=list)
    batch_size: int | None = None
    batches: int = 0
    samples: int | None = 0  # sum of the batch sizes; None where a batch has no leading dimension
    ranks: dict[str, set[int]] = field(default_factory=dict)  # BN input ranks seen in the first forward
    reused: dict[str, int] = field(default_factory=dict)  # BN name -> calls per forward, where > 1
    first_batch: Batch | None = None
    drift: dict[str, Drift] = field(default_factory=dict)  # with recalibrate='all': stored vs data, per BN
    world_size: int = 1  # the processes that calibrated together (torch.distributed)


def _check_estimator(estimator: str) -> None:
    if estimator not in ESTIMATORS:
        raise BadInputError(f"unknown estimator '{estimator}'; use one of: {', '.join(ESTIMATORS)}")


def check_recalibrate(recalibrate: str) -> None:
    if recalibrate not in RECALIBRATE:
        raise BadInputError(f"unknown recalibrate='{recalibrate}'; use one of: {', '.join(RECALIBRATE)}")


def _stored_drift(m: nn.Module, mode: Mode, st: FrozenStats, eps: float) -> Drift:
    """Drift of the module's running statistics (before they are replaced) from ``st``; ``mode``:
    the BN's mode before the calibration run put the module in eval mode."""
    mean, var = getattr(m, "running_mean", None), getattr(m, "running_var", None)
    if mode is Mode.TRAINING or mean is None or var is None:
        return no_drift(TRAINING_NOTE)
    return drift_of(mean.detach().cpu().double().numpy(), var.detach().cpu().double().numpy(),
                    st.mean, st.var_unbiased, eps)


def _owner_key(name: str, m: nn.Module) -> torch.Tensor:
    """The tensor by which an ``F.batch_norm`` call is known to be this module's: its running
    mean, else (``track_running_stats=False``) its weight."""
    for key in ("running_mean", "weight"):
        t = getattr(m, key, None)
        if isinstance(t, torch.Tensor) and not is_lazy(t):
            return t
    raise UnsupportedModelError(
        f"BN '{name}' ({type(m).__name__}) overrides forward and has neither running statistics nor an affine "
        "weight, so bnfold cannot find its F.batch_norm call: replace it by a torch BatchNorm module")


def _calibration_targets(work: nn.Module, warnings: list[str]) -> list[tuple[str, nn.Module]]:
    """Every BN-like module calibration handles: standard BNs (through their forward) and those
    that normalise through ``F.batch_norm`` on their own buffers (:mod:`bnfold.torch.intercept`).
    A ``FrozenBatchNorm2d`` is an affine by design: it keeps its statistics (and folds)."""
    targets: list[tuple[str, nn.Module]] = []
    for name, m in bn_like_modules(work):
        kind = bn_kind(m)
        if kind is BnKind.FROZEN_AFFINE:
            warnings.append(f"BN '{name}' ({type(m).__name__}) is frozen by design; it keeps its statistics")
            continue
        if kind is not BnKind.STANDARD:
            _owner_key(name, m)
        targets.append((name, m))
    return targets


def fold_candidates(work: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every BN-like module with running statistics, for the fold's report (FrozenBatchNorm2d included)."""
    return [(n, m) for n, m in bn_like_modules(work) if getattr(m, "running_mean", None) is not None]


def _stats_dtype(m: nn.Module, in_dtype: torch.dtype) -> torch.dtype:
    """The dtype the BN's running statistics have, or get (see ``_write_stats``)."""
    mean, var, weight = (getattr(m, k, None) for k in ("running_mean", "running_var", "weight"))
    if getattr(m, "track_running_stats", True) and mean is not None and var is not None:
        return var.dtype
    if getattr(m, "affine", True) and weight is not None:
        return weight.dtype
    return in_dtype


def _check_fits(name: str, st: FrozenStats, dtype: torch.dtype) -> None:
    """Refuse statistics that the BN's running buffers cannot hold (float16 tops out at 65504)."""
    if not dtype.is_floating_point:
        return
    limit = torch.finfo(dtype).max
    for what, values in (("mean", np.abs(st.mean)), ("variance", st.var)):
        big = float(values.max(initial=0.0))
        if big > limit:
            raise BadInputError(
                f"BN '{name}' has a population {what} of {big:.3g}, past what its {dtype} running statistics "
                f"can hold ({limit:.3g}); calibrate the model in float32 (module.float()) and convert it after folding")


def _write_stats(m: nn.Module, st: FrozenStats, dtype: torch.dtype, device: torch.device) -> None:
    mean = torch.from_numpy(st.mean)
    var = torch.from_numpy(st.var)
    if (not getattr(m, "track_running_stats", True) or getattr(m, "running_mean", None) is None
            or getattr(m, "running_var", None) is None):
        if getattr(m, "affine", True) and isinstance(m.weight, torch.Tensor):
            dtype, device = m.weight.dtype, m.weight.device
        m.register_buffer("running_mean", mean.to(device=device, dtype=dtype))
        m.register_buffer("running_var", var.to(device=device, dtype=dtype))
        m.register_buffer("num_batches_tracked", torch.tensor(st.batches, dtype=torch.long, device=device))
        setattr(m, "track_running_stats", True)  # noqa: B010 (any BN-like module, typed as nn.Module)
    else:
        with torch.no_grad():
            cast(torch.Tensor, m.running_mean).copy_(mean)
            cast(torch.Tensor, m.running_var).copy_(var)
            tracked = getattr(m, "num_batches_tracked", None)
            if isinstance(tracked, torch.Tensor):
                tracked.fill_(st.batches)


def _forward_failure(exc: Exception, done: int, batch: Batch, dtype: torch.dtype) -> str:
    """One line for a forward that failed on calibration batch ``done`` (1-based), naming a
    floating dtype that differs from the module's, the usual cause (tensors are passed as given;
    numpy arrays are converted)."""
    other = sorted({str(t.dtype) for t in tensors([batch.args, batch.kwargs])
                    if t.is_floating_point() and t.dtype != dtype})
    fix = (f"the batch holds {', '.join(other)} tensors and the module is {dtype}: convert the data "
           f"(x.to({dtype}))" if other else "check that the batches match the module's forward")
    return (f"the module's forward failed on calibration batch {done} ({type(exc).__name__}: "
            f"{one_line(exc, 200)}); {fix}")


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # bnfold/


def _raised_in_bnfold(exc: BaseException) -> bool:
    """Whether ``exc`` was raised by bnfold's own code (its innermost frame in the package), not by
    the model's forward around it."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_PACKAGE + os.sep)


@dataclass(frozen=True)
class _PassOptions:
    """What :func:`run_calibration` was asked, handed on to the pass (one signature, not three)."""

    device: str | torch.device | None
    estimator: str
    allow_reused_bn: bool
    inplace: bool
    progress: Progress | None
    recalibrate: str
    training_graph: bool
    target_se: float
    with_drift: bool


def run_calibration(
    module: nn.Module,
    data: Any,
    *,
    device: str | torch.device | None = None,
    estimator: str = "unbiased",
    allow_reused_bn: bool = False,
    inplace: bool = False,
    progress: Progress | None = None,
    recalibrate: str = "all",
    training_graph: bool = False,
    target_se: float = DEFAULT_TARGET_SE,
    distributed: bool | str = "auto",
    with_drift: bool = True,
) -> CalibrationRun:
    """:func:`_calibration_pass` on one process, or across the ``torch.distributed`` group
    (``distributed``, see :func:`bnfold.distributed.resolve_group`): bnfold's own file data
    (``CalibrationData``, or a ``SharedStream`` every rank reads whole) is split by batch (j mod N);
    any other iterable is this rank's part
    (``DistributedSampler`` style). Every rank's sums and facts are gathered once and merged in rank
    order; an error on any rank before that stops every rank."""
    check_callable(progress, "progress")
    group = resolve_group(distributed)
    opts = _PassOptions(device=device, estimator=estimator, allow_reused_bn=allow_reused_bn, inplace=inplace,
                        progress=progress, recalibrate=recalibrate, training_graph=training_graph,
                        target_se=target_se, with_drift=with_drift)
    try:
        if group is None:
            with collector_paused():
                return _calibration_pass(module, data, opts)
        if isinstance(data, CalibrationData) or (isinstance(data, StreamData) and data.shared):
            data = RankShard(data, group.rank, group.world_size)
        guard = RankGuard(group, key=_rank_key(module, data))
        try:
            with collector_paused():
                run = _calibration_pass(module, data, opts, guard=guard)
            run.world_size = group.world_size
            return run
        except BaseException as exc:  # noqa: BLE001 - sent to the other ranks (before the gather), then raised
            guard.fail(exc)
            raise
    finally:
        release_heap()  # the batches' freed activations back to the kernel (the settled heap kept them)


def _rank_key(module: nn.Module, data: Any) -> dict[str, Any]:
    """What every rank must agree on before their statistics merge: the module's state (names,
    shapes, values: a factory that seeds nothing gives each rank other weights) and, where every
    rank reads the whole data, its batches."""
    digest = hashlib.sha256()
    for name, value in module.state_dict().items():
        if isinstance(value, torch.Tensor) and not is_lazy(value):
            t = value.detach().cpu().contiguous()
            digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    key: dict[str, Any] = {"model state sha256": digest.hexdigest()[:12]}
    if isinstance(data, RankShard):  # every rank reads all of it: the batches must be the same
        key.update({"batch size": data.batch_size, "batches": data.total_batches})
        fingerprint = getattr(data, "fingerprint", None)  # files: their content too
        if fingerprint is not None:
            key["data sha256"] = fingerprint()[:12]
    return key


def _combine_ranks(guard: RankGuard, run: CalibrationRun, sums: dict[str, BnStats], first_call: list[str],
                   in_dtype: dict[str, torch.dtype], max_calls: dict[str, int], warnings: list[str]
                   ) -> tuple[dict[str, BnStats], list[str]]:
    """Every rank's sums (merged in rank order, bitwise the same on each) and run facts."""
    mine = RankFacts(batches=run.batches, samples=run.samples, first_call=list(first_call),
                     in_dtype={n: str(d).removeprefix("torch.") for n, d in in_dtype.items()},
                     max_calls=dict(max_calls), ranks={n: sorted(r) for n, r in run.ranks.items()},
                     warnings=list(warnings))
    per_rank = guard.gather((encode_stats(sums), mine))
    facts = combine_facts([f for _, f in per_rank])
    run.batches, run.samples = facts.batches, facts.samples
    run.ranks = {n: set(r) for n, r in facts.ranks.items()}
    for name, dtype in facts.in_dtype.items():
        in_dtype.setdefault(name, getattr(torch, dtype))
    max_calls.update(facts.max_calls)
    warnings[:] = facts.warnings
    return merge_ranks([decode_stats(s) for s, _ in per_rank]), facts.first_call


def _calibration_pass(module: nn.Module, data: Any, opts: _PassOptions, guard: RankGuard | None = None
                      ) -> CalibrationRun:
    """Calibrate the BNs of ``module`` that ``recalibrate`` selects on ``data`` and freeze them; see
    :func:`calibrate`. ``'training'``: only the BNs that normalise with batch statistics; the others
    keep their running statistics and normalise with them during the pass (as the deployed model
    will). ``'all'``: every BN (Algorithm 2's training network), and ``run.drift`` holds each one's
    drift from its running statistics. With nothing to calibrate, ``run.first_batch`` is still
    the data's first batch. ``training_graph``: run the module's training-time forward instead
    (:mod:`bnfold.torch.training_graph`: BNs only reached in training mode get calibrated too)."""
    _check_estimator(opts.estimator)
    check_recalibrate(opts.recalibrate)
    opts = dataclasses.replace(opts, target_se=check_target_se(opts.target_se))
    device = opts.device
    if not isinstance(module, nn.Module):
        raise BadInputError(f"expected a torch.nn.Module, got {type(module).__name__}")
    if isinstance(module, torch.jit.ScriptModule):  # its BNs' forwards cannot be replaced or hooked
        raise UnsupportedModelError(
            "a TorchScript module cannot be calibrated in PyTorch (its BN modules' forwards cannot be replaced); "
            "calibrate the nn.Module it was scripted from, or fold it through ONNX: bnfold.torch.convert(module, "
            "data, 'out.onnx')")
    here = module_device(module)  # the copy's too
    if here.type == "meta" or (device is not None and torch.device(device).type == "meta"):
        raise BadInputError("the module's weights are on the 'meta' device (shapes, no values): give it its weights "
                            "first (module.to_empty(device='cpu'), then load_state_dict) and calibrate that")
    move = device is not None and here != torch.device(device)
    if (torch.device(device) if device is not None else here).type == "cpu":
        settle_heap()  # before the copy: each batch's activations then reuse the pages of the last
    # a calibration reads the weights: where a core is free the copy's own come in the background
    # during the first forward; else a plain copy first (stop 23, ResNet-50 on 2 busy cores with the
    # heap settled: 14-28 ms faster than cloning after the first forward under DeferredCopy's guard)
    deferred = None if opts.inplace or move or not spare_core() else deferred_copy(module)
    work = module if opts.inplace else deferred.module if deferred is not None else copy_module(module)
    dev = torch.device(device) if device is not None else here
    if move:
        work.to(dev)
    try:
        return _run_pass(work, dev, data, deferred, opts, guard)
    except BaseException:
        if deferred is not None:
            deferred.abandon()
        raise


def _run_pass(work: nn.Module, dev: torch.device, data: Any, deferred: DeferredCopy | None, opts: _PassOptions,
              guard: RankGuard | None) -> CalibrationRun:
    """The pass of :func:`_calibration_pass` on ``work`` (the module itself, or its copy; with
    ``deferred``, the copy's parameters get their own storage during the first forward, and
    ``deferred.finish()`` is called before anything is written to ``work``)."""
    estimator, allow_reused_bn, progress = opts.estimator, opts.allow_reused_bn, opts.progress
    recalibrate, training_graph, target_se = opts.recalibrate, opts.training_graph, opts.target_se
    warnings: list[str] = []
    targets = _calibration_targets(work, warnings)
    modes = {name: bn_mode(m) for name, m in targets}  # before the run puts the module in eval mode
    if recalibrate == "training":
        targets = [(name, m) for name, m in targets if modes[name] is Mode.TRAINING]
    run = CalibrationRun(module=work, stats={}, warnings=warnings)
    if not targets:
        work.eval()
        for batch in iter_batches(data, dev, float_dtype(work)):  # the example the fold traces with
            run.first_batch, run.batch_size = batch, batch.size
            break
        if deferred is not None:
            deferred.finish()
        return run

    scratch = Scratch()
    acc = {name: _DeviceStats(name, scratch) for name, _ in targets}
    calls_now = {name: 0 for name, _ in targets}
    max_calls = {name: 0 for name, _ in targets}
    first_call: list[str] = []
    first_call_skip: set[str] = set()  # non-BN modules with BN buffers that forward never normalises with
    in_dtype: dict[str, torch.dtype] = {}
    state = {"first": True}

    # bnfold's own BN computation, run without torch-function modes while the copy's guard watches
    # the first forward (it only reads the BN's parameters; ~1600 calls of a ResNet-50 forward)
    quiet: list[Callable[[], Any]] = [contextlib.nullcontext]

    def make_forward(name: str, bn: _BatchNorm, with_act: bool) -> Callable[..., torch.Tensor]:
        """The BN's forward for the run: count the call (reuse, ranks, dtype), then normalise with
        the batch statistics and accumulate them (then, for timm's ``BatchNormAct2d``, its ``drop``
        and ``act``, as its own forward does; see :mod:`bnfold.torch.bn_kinds`). A plain function in
        the instance's ``__dict__`` rather than a forward pre-hook: a module without hooks takes
        torch's fast call path, and no torch-function mode has to catch the ``F.batch_norm`` call."""
        stats = acc[name]

        def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
            if not args or not isinstance(args[0], torch.Tensor):
                raise BadInputError(f"BN '{name}' was called without a tensor input")
            if len(args) > 1 or kwargs:
                raise BadInputError(f"BN '{name}' was called with {len(args)} positional and {len(kwargs)} "
                                    "keyword arguments; a BatchNorm takes one tensor")
            note_call(name, args[0])
            with quiet[0]():
                y = _batch_stat_forward(bn, args[0], stats)
            if with_act:
                return cast(torch.Tensor, cast(nn.Module, bn.act)(cast(nn.Module, bn.drop)(y)))
            return y

        return forward

    def note_call(name: str, x: torch.Tensor) -> None:
        """Count one call of BN ``name`` on ``x``: reuse, input rank and dtype."""
        calls_now[name] += 1
        if calls_now[name] > 1 and not allow_reused_bn:
                raise BadInputError(
                    f"BN '{name}' is applied more than once in one forward; each call site normalises a "
                    "different population. Give each site its own BN, or pass allow_reused_bn=True to "
                    "pool the statistics of all its calls"
                )
        max_calls[name] = max(max_calls[name], calls_now[name])
        if name not in in_dtype:
            in_dtype[name] = x.dtype
            first_call.append(name)
        if state["first"]:
            run.ranks.setdefault(name, set()).add(x.dim())

    forced: list[str] = []  # modules whose F.batch_norm call uses batch statistics in eval mode too

    def intercepted(name: str, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    eps: float, batch_stats: bool) -> torch.Tensor:
        """An ``F.batch_norm`` call on the buffers of BN ``name`` (a module that overrides forward)."""
        if batch_stats and not modules_by_name[name].training and name not in forced:
            forced.append(name)
        _check_eps(name, eps)
        note_call(name, x)
        eps_of[name] = eps
        with quiet[0]():
            return batch_stat_norm(x, weight, bias, eps, acc[name])

    # BNs that override forward: calibrated through their F.batch_norm calls; a pre-hook counts
    # their calls, to tell one that never reaches F.batch_norm (bnfold cannot see its computation)
    others = [(name, m) for name, m in targets if bn_kind(m) is BnKind.CUSTOM]
    modules_by_name = dict(others)
    owners = {id(_owner_key(name, m)): name for name, m in others}
    eps_of: dict[str, float] = {name: float(getattr(m, "eps", 1e-5)) for name, m in targets}
    module_calls = {name: 0 for name, _ in others}
    for name, m in others:
        if isinstance(m, torch.jit.ScriptModule):  # takes no hooks; its F.batch_norm runs in TorchScript, unseen
            raise UnsupportedModelError(
                f"BN '{name}' is a TorchScript module inside an eager model, whose BN computation bnfold cannot "
                "see: keep it an eager BatchNorm module (torch.jit.script the whole model after folding)")
    hooks = []
    for name, m in others:
        def count(_m: nn.Module, _args: Any, _name: str = name) -> None:
            module_calls[_name] += 1
        hooks.append(m.register_forward_pre_hook(count))
    intercept = BatchNormIntercept(owners, intercepted) if others else None
    call = eager(work)  # a torch.compile'd module: the module it compiles (bnfold's BN code is not dynamo's)

    training = {m: m.training for m in work.modules()}
    patched: list[nn.Module] = []
    total = count_batches(data)
    try:
        work.eval()
        for name, m in targets:
            kind = bn_kind(m)
            if isinstance(m, _BatchNorm) and kind in (BnKind.STANDARD, BnKind.BN_ACT):
                _check_eps(name, m.eps)
                m.forward = make_forward(name, m, kind is BnKind.BN_ACT)  # type: ignore[method-assign]
                patched.append(m)
        if progress:
            progress(0, total)
        dtype = float_dtype(work)
        draws = RandomDraws(dev)  # each forward watched for draws from torch's generators
        graph = training_time_forward(work) if training_graph else contextlib.nullcontext()
        with torch.no_grad(), graph as named:
            for done, batch in enumerate(iter_batches(data, dev, dtype), start=1):
                if done == 1:
                    check_arity(work, batch)
                    run.first_batch = batch
                    run.batch_size = batch.size
                    if deferred is not None and spare_core():  # the data's iterator (any DataLoader worker) exists now
                        deferred.start()
                for k in calls_now:
                    calls_now[k] = 0
                try:
                    if deferred is not None:
                        quiet[0] = torch._C.DisableTorchFunction
                    with draws.watch(named), deferred.guard() if deferred is not None else contextlib.nullcontext():
                        if intercept is not None:
                            with intercept:
                                call(*batch.args, **batch.kwargs)
                        else:
                            call(*batch.args, **batch.kwargs)
                    quiet[0] = contextlib.nullcontext
                except BnfoldError:
                    raise
                except (RuntimeError, TypeError, ValueError, IndexError) as exc:
                    raise BadInputError(_forward_failure(exc, done, batch, dtype)) from exc
                except Exception as exc:  # the model's own raise or assert on the batch; bnfold's own pass
                    if _raised_in_bnfold(exc):
                        raise
                    raise BadInputError(_forward_failure(exc, done, batch, dtype)) from exc
                if deferred is not None:  # every parameter of the copy has storage of its own from here on
                    deferred.finish()
                    deferred = None
                state["first"] = False
                run.batches = done
                collect_young()
                size = batch.size
                run.samples = None if run.samples is None or size is None else run.samples + size
                if progress:
                    progress(done, total)
        if deferred is not None:  # no forward ran (a rank without batches of its own): the copy's storage now
            deferred.finish()
        drew = draws.warning(named)
        if drew:
            warnings.append(drew)
    except BaseException:
        for mod, flag in training.items():
            mod.training = flag
        raise
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)
        for h in hooks:
            h.remove()
    if forced:
        for mod, flag in training.items():
            mod.training = flag
        name = forced[0]
        raise UnsupportedModelError(
            f"BN '{name}' ({type(modules_by_name[name]).__name__}) calls F.batch_norm on its running statistics with "
            "training=True in eval mode, so it normalises with each batch's statistics and would never use the "
            "calibrated ones: pass training=self.training (as torch's BatchNorm does)")
    for name, m in others:
        if name in first_call:
            continue
        if module_calls[name] and isinstance(m, _BatchNorm):
            for mod, flag in training.items():
                mod.training = flag
            raise UnsupportedModelError(
                f"BN '{name}' ({type(m).__name__}) overrides forward and does not call F.batch_norm on its own "
                "buffers, so bnfold cannot calibrate it: replace it by a torch BatchNorm module")
        if module_calls[name]:  # running_mean/running_var buffers, but no BN computation on them
            warnings.append(f"'{name}' ({type(m).__name__}) has running_mean/running_var buffers but does not "
                            "call F.batch_norm on them; it is left as it is")
        first_call_skip.add(name)
    sums = {name: acc[name].to_bnstats() for name in first_call}
    # one host copy per BN, checked on the rank that saw it (so a bad rank is named), then merged over the
    # ranks and finalized as on the ONNX path
    for name in first_call:  # forward order: the first BN that saw inf/nan is the one to name
        s = sums[name]
        if not all(np.isfinite(a).all() for a in (s.sum_mu, s.sum_var, s.pooled_mean, s.pooled_m2)):
            raise BadInputError(
                f"BN '{name}' saw non-finite activations (inf or nan) during calibration; check the "
                "calibration data and the layers before this BN"
            )
    if guard is not None:  # every rank's sums and facts, merged in rank order (bnfold.distributed)
        sums, first_call = _combine_ranks(guard, run, sums, first_call, in_dtype, max_calls, warnings)
        first_call_skip -= set(first_call)
    if run.batches == 0:
        for mod, flag in training.items():
            mod.training = flag
        raise BadInputError("the calibration data is empty: give at least one batch")
    modules = dict(targets)
    for name, m in targets:
        if name in first_call_skip:
            continue
        if name not in sums:
            warnings.append(f"BN '{name}' was never called during calibration; it keeps its stored statistics"
                            + ("" if training_graph else f" ({TRAINING_GRAPH_HINT})"))
            continue
        st = finalize(sums[name], estimator, name, target_se)
        _check_fits(name, st, _stats_dtype(m, in_dtype[name]))
        run.stats[name] = st
        if recalibrate == "all" and opts.with_drift:
            run.drift[name] = _stored_drift(m, modes[name], st, eps_of[name])
    for name, st in run.stats.items():  # all checked first: a refusal leaves every BN as it was
        _write_stats(modules[name], st, in_dtype[name], dev)
    for name, n in max_calls.items():
        if n > 1:
            run.reused[name] = n
            warnings.append(
                f"BN '{name}' is applied at {n} places per forward; its statistics pool all of them "
                "(allow_reused_bn=True)"
            )
    warnings.extend(w for w in (gap_warning(run.stats), sufficiency_warning(run.stats)) if w)
    warnings.extend(getattr(data, "notes", ()))  # what the data's reader passed over (CalibrationData)
    work.eval()
    return run


def calibrate(
    module: nn.Module,
    data: Any,
    *,
    device: str | torch.device | None = None,
    estimator: str = "unbiased",
    allow_reused_bn: bool = False,
    inplace: bool = False,
    progress: Progress | None = None,
    training_graph: bool = False,
    target_se: float = DEFAULT_TARGET_SE,
    distributed: bool | str = "auto",
) -> tuple[nn.Module, dict[str, FrozenStats]]:
    """Freeze every BatchNorm of ``module`` with population statistics from ``data``.

    ``data``: an iterable of batches (tensors, numpy arrays, tuples/lists for positional inputs,
    dicts for keyword inputs, or a ``DataLoader`` yielding those); see :mod:`bnfold.torch.batches`.
    Each BN normalises with its batch statistics while the rest of the network is in eval mode
    (Algorithm 2's training network), under ``torch.no_grad()``, on ``device`` (default: the
    module's). ``estimator`` picks ``'unbiased'`` (Algorithm 2, default) or ``'pooled'``.
    ``distributed`` (``"auto"``, True, False): inside an initialised ``torch.distributed`` group of more
    than one process (``"auto"``), every rank calls ``calibrate`` with its own part of the data (a
    ``DistributedSampler``-style loader) and all ranks get the same statistics, merged in float64
    (README, "Distributed calibration").

    Returns ``(frozen, stats)``: the module in eval mode with the new ``running_mean`` /
    ``running_var`` (a ``track_running_stats=False`` BN gains running buffers), and the
    :class:`FrozenStats` per BN qualified name. ``module`` itself is left untouched unless
    ``inplace=True`` (then ``frozen is module``); the copy's weights are made during the first
    forward pass (:mod:`bnfold.torch.module_copy`), so a forward that writes into its parameters
    from another thread or a C++ extension needs ``calibrate(copy.deepcopy(module), data,
    inplace=True)``. A BN applied more than once per forward is
    refused unless ``allow_reused_bn=True`` (its calls are then pooled, with a warning).
    ``training_graph=True`` runs the module's training-time forward (``self.training`` branches
    taken, e.g. auxiliary heads) with Dropout and stochastic depth off, so BNs that only run in
    training mode are calibrated too (:mod:`bnfold.torch.training_graph`).
    Each :class:`FrozenStats` has ``sufficiency``: the standard errors of its statistics from the
    batch-to-batch spread against ``target_se`` (default 0.01 = 1 %; docs/math.md section 2.2),
    and a warning names the BNs that miss it. Warnings (that one, a BN never called during
    calibration, which keeps its stored statistics and is not in ``stats``, a reused BN pooled) are
    Python warnings of class :class:`bnfold.errors.BnfoldWarning`.

    Raises :class:`BadInputError` for empty data, a BN that never saw more than one value per
    channel in a batch, non-finite activations (naming the first BN that saw them), a reused BN,
    or a forward that fails on a batch (naming the batch and a floating dtype that differs from
    the module's; torch's error is the ``__cause__``).
    """
    check_device(device)
    refuse_read_generator(data)
    run = run_calibration(module, data, device=device, estimator=estimator, allow_reused_bn=allow_reused_bn,
                          inplace=inplace, progress=progress, training_graph=training_graph, target_se=target_se,
                          distributed=distributed, with_drift=False)  # drift: for fold's report, not returned here
    for message in run.warnings:  # no report here to carry them (fold's report does)
        _warn(message, BnfoldWarning, stacklevel=2)
    return run.module, run.stats


def drift(
    module: nn.Module,
    data: Any,
    *,
    device: str | torch.device | None = None,
    allow_reused_bn: bool = False,
    progress: Progress | None = None,
    training_graph: bool = False,
) -> dict[str, Drift]:
    """How far each BN's running statistics are from ``data``'s (``module`` is not changed).

    The data's statistics are the Algorithm 2 estimates :func:`calibrate` would write (every BN
    normalising with its batch statistics); per BN qualified name a :class:`bnfold.records.Drift`:
    ``mean_shift_sigma_max`` = max over channels of |running_mean - mu| / sqrt(var + eps),
    ``log_var_ratio_max`` = max over channels of |ln((running_var + eps) / (var + eps))|, and the
    ``worst_channel``. A BN that normalises with batch statistics (``train()``,
    ``track_running_stats=False``) has no running statistics in use: its figures are None and
    ``note`` says so. ``data`` as for :func:`calibrate`, and so is ``training_graph``. A BN the pass
    never calls (an auxiliary head that runs only in training) has no record, with a warning, as in
    :func:`calibrate`, whose other warnings are given too (class :class:`BnfoldWarning`).
    """
    check_device(device)
    refuse_read_generator(data)
    run = run_calibration(module, data, device=device, allow_reused_bn=allow_reused_bn, progress=progress,
                          recalibrate="all", training_graph=training_graph)
    for message in run.warnings:  # a BN without a record is named, never dropped silently
        _warn(message, BnfoldWarning, stacklevel=2)
    return dict(run.drift)

