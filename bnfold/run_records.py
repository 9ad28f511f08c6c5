"""Records of a run: the fold plan, the verification results and the report.

Split from :mod:`bnfold.records` (the statistics records) so that the PyTorch front end, which needs
only those, does not pay for defining these (~6 ms of a one-shot ``import bnfold.torch``).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from bnfold.json_values import json_safe
from bnfold.records import Action, Drift, FrozenStats, Mode, Reason


# BnInfo, FoldDecision (and discover.BnSite) are made once per BN, thousands per model: plain
# dataclasses with slots, since a frozen dataclass's __init__ costs about 2.6x (one
# object.__setattr__ per field). Treat them as read-only all the same.
@dataclass(slots=True)
class BnInfo:
    """A BatchNormalization node found in the graph (before freezing)."""

    name: str  # node name (made unique by load if empty or duplicated)
    mode: Mode
    input: str  # X
    output: str  # Y
    producer: str | None  # name of the node producing X (None for a graph input)
    producer_op: str | None
    epsilon: float
    channels: int | None  # C, when known from the parameters
    graph_path: str = ""  # "" for the main graph, "node/attr" path for subgraphs



@dataclass(slots=True)
class FoldDecision:
    """What ``fold`` will do with one BN. Produced by the planner, consumed by ``apply``."""

    bn: str  # BN node name
    action: Action
    target: str | None = None  # node the BN folds into
    direction: str | None = None  # "backward" (into producer) or "forward" (into following Conv)
    reason: Reason | None = None  # why not folded, or a note for a folded BN
    detail: str = ""  # one human sentence
    through: tuple[str, ...] = ()  # look-through nodes between target and BN (backward)



@dataclass(frozen=True)
class FoldPlan:
    decisions: tuple[FoldDecision, ...]

    def by_bn(self) -> dict[str, FoldDecision]:
        return {d.bn: d for d in self.decisions}



#: ``OutputMetrics.error_histogram`` bins: decades 10**HIST_LO .. 10**HIST_HI (clipped), exact zeros
#: under HIST_ZERO
HIST_LO, HIST_HI, HIST_ZERO = -12, 6, -99



@dataclass(frozen=True)
class OutputMetrics:
    """Every metric of one output, computed by ``bnfold.verification.metrics`` (whose docstring defines
    each field exactly)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    atol: float
    rtol: float
    error_stat: str
    quantile: float | None
    passed: bool
    elements: int
    max_abs: float
    p99_abs: float
    mean_abs: float
    median_abs: float
    max_rel: float
    mismatches: int
    mismatch_pct: float
    worst_index: tuple[int, ...] | None
    worst_ref: float | None
    worst_cand: float | None
    min_atol: float
    min_rtol: float
    cosine: float | None
    snr_db: float | None
    max_ulp: int | None
    nan_ref: int
    nan_cand: int
    inf_ref: int
    inf_cand: int
    top1: float | None
    top5: float | None
    # |a-b| over the finite pairs by decade: (lower exponent k, count) for 10**k <= d < 10**(k+1),
    # k clipped to [HIST_LO, HIST_HI]; exact zeros under k = HIST_ZERO. Only non-empty bins.
    error_histogram: tuple[tuple[int, int], ...] = ()
    # the largest elementwise float noise floor of the reference (``verification.noise_floor``);
    # None when no floor was estimated. Elements within ``margin * floor`` pass (``VerifyResult.rule``).
    floor_max: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: non-finite floats as ``"inf"``, ``"-inf"``, ``"nan"``; tuples as lists."""
        return {f.name: json_safe(getattr(self, f.name)) for f in fields(self)}



@dataclass(frozen=True)
class ProviderRun:
    """Reference vs candidate on one execution provider."""

    provider: str  # requested short name: "cpu", "cuda"
    status: str  # "ran" | "skipped" (provider not available and --allow-missing-providers)
    used: tuple[str, ...]  # execution providers the candidate session really used
    passed: bool
    outputs: tuple[OutputMetrics, ...] = ()
    # (output, max |reference on this provider - reference on the first provider|): provider noise
    noise_floor: tuple[tuple[str, float], ...] = ()
    note: str = ""



@dataclass(frozen=True)
class SiteResult:
    """A fold site: the folded producer's output against the original BN's output (CPU)."""

    bn: str
    tensor: str
    target: str
    direction: str  # "backward" | "forward" | "kept"
    position: int  # node position of the BN in the reference: depth along the network
    max_abs: float
    max_rel: float
    atol: float
    rtol: float
    passed: bool
    worst_channels: tuple[tuple[int, float], ...] = ()  # (channel, max abs error), worst first
    floor_max: float | None = None  # the largest noise floor at this site (None: not estimated)



@dataclass(frozen=True)
class VerifyResult:
    """The verdict and every figure behind it. ``passed`` is what a CI job gates on."""

    passed: bool
    samples: int
    runs: tuple[ProviderRun, ...]
    sites: tuple[SiteResult, ...] = ()
    first_divergent_site: str | None = None
    rule: str = "|candidate - reference| <= atol + rtol * |reference|"
    settings: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    repro_dir: str | None = None
    note: str = ""

    @property
    def ran(self) -> tuple[ProviderRun, ...]:
        return tuple(r for r in self.runs if r.status == "ran")

    @property
    def provider(self) -> str:
        """The first provider that ran (the one ``outputs`` describes)."""
        ran = self.ran
        return ran[0].provider if ran else (self.runs[0].provider if self.runs else "")

    @property
    def outputs(self) -> tuple[OutputMetrics, ...]:
        ran = self.ran
        return ran[0].outputs if ran else ()

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for r in self.ran for o in r.outputs), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((o.max_rel for r in self.ran for o in r.outputs), default=0.0)



@dataclass
class BnRecord:
    """The report's line for one BN."""

    name: str
    mode_before: Mode
    action: Action
    target: str | None = None
    direction: str | None = None
    reason: Reason | None = None
    detail: str = ""
    channels: int | None = None
    stats: FrozenStats | None = None  # None when the stored statistics were kept
    drift: Drift | None = None  # stored vs re-estimated statistics (recalibrate='all'); None otherwise



@dataclass
class Report:
    """Everything ``fold`` did. Rendered by ``bnfold.report``; computes nothing itself."""

    input_path: str | None
    output_path: str | None
    input_sha256: str | None
    output_sha256: str | None
    estimator: str
    batch_size: int | None
    calibrated: bool
    bns: list[BnRecord]
    verification: VerifyResult | None = None
    warnings: list[str] = field(default_factory=list)
    dry_run: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    recalibrate: str = "training"  # which BNs data re-estimates: "training" (batch-statistics BNs) or "all"

    @property
    def folded(self) -> int:
        return sum(1 for b in self.bns if b.action is Action.FOLDED)

    @property
    def kept(self) -> int:
        return sum(1 for b in self.bns if b.action is Action.FROZEN_KEPT)

