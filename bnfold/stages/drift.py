"""Drift of every BN's stored statistics from the data's (``inspect`` with data, ``fold`` with
``recalibrate='all'``): the stored mean/var read from the graph before anything is frozen, the
data's from the calibration stage (Algorithm 2: ``FrozenStats.mean`` and ``var_unbiased``), the
figures from :func:`bnfold.formulas.drift.drift`.

A BN without meaningful stored statistics gets a record without figures that says why: a
training-mode BN normalises with batch statistics (its running-statistics inputs are never read
at inference), a decomposed one has none, and a subgraph BN is not calibrated.
"""
from __future__ import annotations

import numpy as np

from bnfold.formulas.drift import drift, no_drift
from bnfold.records import Drift, FrozenStats, Mode
from bnfold.stages.discover import BnSite
from bnfold.stages.work import Work

TRAINING_NOTE = ("normalises with batch statistics (training mode): its stored running statistics are not used, "
                 "so there is nothing to compare")
DECOMPOSED_NOTE = "normalises with batch statistics (decomposed pattern): no stored statistics to compare"
SUBGRAPH_NOTE = "inside a subgraph: not calibrated, no data statistics"


def stored_stats(work: Work, site: BnSite) -> tuple[np.ndarray, np.ndarray] | None:
    """The (mean, var) a main-graph inference BN holds, when both are constants."""
    if site.pos is None:
        return None
    node = work.index.nodes[site.pos]
    if len(node.input) < 5:
        return None
    mean, var = work.consts.value(node.input[3]), work.consts.value(node.input[4])
    if mean is None or var is None:
        return None
    return np.asarray(mean), np.asarray(var)


def stored_drift(work: Work, site: BnSite, data: FrozenStats | None) -> Drift:
    """The drift record of one BN against the data's statistics ``data`` (None: not calibrated)."""
    if site.pos is None:
        return no_drift(SUBGRAPH_NOTE)
    if site.info.mode is Mode.TRAINING:
        return no_drift(TRAINING_NOTE)
    if site.info.mode is Mode.DECOMPOSED:
        return no_drift(DECOMPOSED_NOTE)
    if data is None:
        return no_drift("no data statistics were computed for this BN")
    stored = stored_stats(work, site)
    if stored is None:
        return no_drift("its stored mean or variance is not a constant")
    return drift(stored[0], stored[1], data.mean, data.var_unbiased, site.info.epsilon)


def drifts(work: Work, data: dict[str, FrozenStats]) -> dict[str, Drift]:
    """The drift record of every BN of ``work`` (call before ``freeze`` replaces the stored values)."""
    return {s.info.name: stored_drift(work, s, data.get(s.info.name)) for s in work.sites}
