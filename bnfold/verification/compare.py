"""The short API to compare two models or two sets of outputs (the full engine is ``engine.verify``).

The rule and the default tolerances are in :mod:`bnfold.verification.tolerances`; the metrics in
:mod:`bnfold.verification.metrics`.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import numpy as np

from bnfold.run_records import OutputMetrics, VerifyResult
from bnfold.verification.config import VerifyConfig
from bnfold.verification.engine import verify
from bnfold.verification.metrics import compute_metrics
from bnfold.verification.noise_floor import MARGIN
from bnfold.verification.tolerances import resolve_tolerances

__all__ = [
    "compare_outputs",
    "verify_models",
]


def compare_outputs(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray],
                    dtypes: Mapping[str, str] | None = None,
                    atol: float | tuple[float | None, Mapping[str, float]] | None = None,
                    rtol: float | tuple[float | None, Mapping[str, float]] | None = None,
                    floors: Mapping[str, np.ndarray] | None = None) -> list[OutputMetrics]:
    """``OutputMetrics`` per reference output (in its order); a missing candidate output fails.

    ``atol``/``rtol``: one value for every output, or a :func:`parse_tolerances` result
    ``(global, {output: value})``; None: the output dtype's default. ``floors``: the reference's
    noise floor per output (:mod:`bnfold.verification.noise_floor`); an element within
    ``MARGIN`` x floor passes too.
    """
    atol_spec = atol if isinstance(atol, tuple) else (atol, {})
    rtol_spec = rtol if isinstance(rtol, tuple) else (rtol, {})
    results: list[OutputMetrics] = []
    for name, ref in reference.items():
        dtype = (dtypes or {}).get(name) or str(np.asarray(ref).dtype)
        a, r = resolve_tolerances(name, dtype, atol_spec, rtol_spec)
        cand = candidate.get(name)
        if cand is None:
            cand = np.full(np.shape(ref)[:0] + (0,), np.nan)  # shape mismatch: fails with inf error
        results.append(compute_metrics(name, np.asarray(ref), np.asarray(cand), dtype=dtype, atol=a, rtol=r,
                                       floor=(floors or {}).get(name), margin=MARGIN))
    return results


def verify_models(reference_path: str | os.PathLike[str], candidate_path: str | os.PathLike[str],
                  batches: Iterable[Mapping[str, np.ndarray]], *, provider: str = "cpu",
                  atol: float | None = None, rtol: float | None = None, localize: bool = True,
                  noise_floor: bool = True) -> VerifyResult:
    """Reference vs candidate on one provider with global tolerances (see ``engine.verify``)."""
    config = VerifyConfig(providers=(provider,), atol=(atol, {}), rtol=(rtol, {}), localize=localize,
                          noise_floor=noise_floor)
    return verify(reference_path, candidate_path, list(batches), config)
