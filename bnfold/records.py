"""Plain records that flow between the pipeline's stages.

Every stage reads and writes these; none reaches into another stage's internals.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np


class Mode(str, enum.Enum):
    """How a BN normalises before bnfold touches it."""

    INFERENCE = "inference"  # stored statistics
    TRAINING = "training"  # training_mode=1: batch statistics
    DECOMPOSED = "training-decomposed"  # mean/var inputs computed from its own input



class Action(str, enum.Enum):
    FOLDED = "folded"  # removed, absorbed into ``target``
    FROZEN_KEPT = "frozen-kept"  # stays as an inference BN; ``reason`` says why



class Reason(str, enum.Enum):
    """Why a BN was not folded (or a note on how it was)."""

    NO_PRODUCER = "NO_PRODUCER"  # its input is a graph input / has no producing node
    UNSUPPORTED_PRODUCER = "UNSUPPORTED_PRODUCER"  # producer is not Conv/ConvTranspose/Gemm/MatMul
    PRODUCER_FANOUT = "PRODUCER_FANOUT"  # producer's output feeds another node or is a graph output
    NOT_CONSTANT = "NOT_CONSTANT"  # a weight, bias or BN parameter is not a constant
    CHANNEL_MISMATCH = "CHANNEL_MISMATCH"  # producer channels do not line up with BN axis 1
    UNKNOWN_RANK = "UNKNOWN_RANK"  # rank/shape needed to prove axis 1 is the channel axis is unknown
    PADDED_FORWARD_FOLD = "PADDED_FORWARD_FOLD"  # BN->Conv where the Conv pads: not exact
    DTYPE_OVERFLOW = "DTYPE_OVERFLOW"  # folded value overflows / underflows the weight dtype
    UNSUPPORTED_DTYPE = "UNSUPPORTED_DTYPE"  # integer / quantized weights
    IN_SUBGRAPH = "IN_SUBGRAPH"  # BN lives in an If/Loop/Scan body or a function
    SPATIAL_ZERO = "SPATIAL_ZERO"  # legacy spatial=0 BN: per-activation statistics
    BN_OUTPUT_FANOUT = "BN_OUTPUT_FANOUT"  # (forward fold) BN output feeds several nodes / graph output
    HOOKED = "HOOKED"  # (PyTorch) the BN or its producer has forward hooks that folding would change
    UNKNOWN_BN_FORWARD = "UNKNOWN_BN_FORWARD"  # (PyTorch) a BN subclass/module whose forward bnfold cannot fold
    # notes attached to folded BNs
    SHARED_WEIGHT_CLONED = "SHARED_WEIGHT_CLONED"  # weight shared with another node: folded copy made



@dataclass
class BnStats:
    """Per-channel calibration sums for one BN, float64. Mergeable by ``merge``.

    Algorithm 2 needs only sums that add exactly across batches and ranks:
    ``sum_m`` = sum m_b, ``sum_m1`` = sum (m_b - 1), ``sum_mu`` = sum m_b*mu_b,
    ``sum_var`` = sum m_b*sigma2_b (sigma2_b biased). The pooled estimator
    keeps a running (count, mean, M2) merged with Chan's formula.

    The batch-to-batch spread (``bnfold/formulas/sufficiency.py``, docs/math.md section 2.2) is two
    more running weighted (weight, mean, M2) triples, merged with Chan's formula too: the batch
    means mu_b with weight m_b (weight ``sum_m``, mean ``pooled_mean``, M2 ``mu_m2``) and the
    unbiased batch variances v_b = m_b*sigma2_b/(m_b - 1) with weight m_b - 1 (weight ``sum_m1``,
    mean ``var_mean``, M2 ``var_m2``, over ``var_batches`` batches with m_b >= 2). ``samples`` is
    sum N_b, the leading-axis items the BN saw.
    """

    channels: int
    batches: int = 0
    sum_m: int = 0
    sum_m1: int = 0
    sum_mu: np.ndarray = field(default=None)  # type: ignore[arg-type]
    sum_var: np.ndarray = field(default=None)  # type: ignore[arg-type]
    pooled_mean: np.ndarray = field(default=None)  # type: ignore[arg-type]
    pooled_m2: np.ndarray = field(default=None)  # type: ignore[arg-type]
    samples: int = 0
    var_batches: int = 0
    mu_m2: np.ndarray = field(default=None)  # type: ignore[arg-type]
    var_mean: np.ndarray = field(default=None)  # type: ignore[arg-type]
    var_m2: np.ndarray = field(default=None)  # type: ignore[arg-type]

    def __post_init__(self) -> None:
        for attr in ("sum_mu", "sum_var", "pooled_mean", "pooled_m2", "mu_m2", "var_mean", "var_m2"):
            if getattr(self, attr) is None:
                setattr(self, attr, np.zeros(self.channels, dtype=np.float64))



@dataclass(frozen=True)
class FrozenStats:
    """The statistics written into a frozen BN, with the comparison of both estimators."""

    mean: np.ndarray  # float64 (C,)
    var: np.ndarray  # float64 (C,), the chosen estimator
    var_unbiased: np.ndarray  # Algorithm 2
    var_pooled: np.ndarray  # pooled population variance
    gap: float  # max over channels of |pooled - unbiased| / max(pooled, tiny)
    samples: int  # sum m_b
    batches: int
    sufficiency: Sufficiency | None = None  # how much data is enough (None: not computed)



@dataclass(frozen=True)
class Sufficiency:
    """Whether the calibration data sufficed for one BN (``bnfold/formulas/sufficiency.py``), from
    the batch-to-batch spread of its ``batches`` batch estimates: the largest standard error of
    E[x] in units of the channel's sigma (``mean_se_sigma_max``), the largest relative standard
    error of Var[x] (``var_rse_max``), the ``worst_channel`` (the larger of the two), and the
    samples (leading-axis items) that would bring the worst figure to ``target``
    (``samples_for_target``, scaling as 1/sqrt(n)). ``samples`` is how many the BN saw. With fewer
    than two batches, or no channel with a non-zero variance, the figures are None and ``reason``
    says why."""

    batches: int
    samples: int
    target: float
    mean_se_sigma_max: float | None
    var_rse_max: float | None
    worst_channel: int | None
    samples_for_target: int | None
    reason: str = ""

    @property
    def met(self) -> bool | None:
        """True where the worst figure is within the target; None where there are no figures."""
        if self.mean_se_sigma_max is None or self.var_rse_max is None:
            return None
        return max(self.mean_se_sigma_max, self.var_rse_max) <= self.target



@dataclass(frozen=True)
class Drift:
    """How far a BN's stored statistics are from the data's (Algorithm 2 estimates), per channel c:
    ``mean_shift_sigma_max`` = max_c |mu_stored - mu_data| / sqrt(var_data + eps) and
    ``log_var_ratio_max`` = max_c |ln((var_stored + eps) / (var_data + eps))|; ``worst_channel`` is
    the channel with the larger of the two (``bnfold/formulas/drift.py``). A BN without meaningful
    stored statistics (training mode, decomposed, in a subgraph) has the figures None and ``note``
    says why."""

    mean_shift_sigma_max: float | None
    log_var_ratio_max: float | None
    worst_channel: int | None
    note: str = ""


@dataclass(frozen=True)
class InputSpec:
    """One model input: its name, element type and shape.

    ``shape`` entries are ints for static dims and ``None`` for dynamic ones; a symbolic name (a
    ``str``) or a negative int is normalised to ``None``. Dim 0 is the batch axis and is never
    checked against the data. ``shape=None`` means the rank is unknown (no rank/dim checks).
    """

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...] | None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        if self.shape is not None:
            dims = tuple(
                int(d) if isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 else None
                for d in self.shape
            )
            object.__setattr__(self, "shape", dims)
