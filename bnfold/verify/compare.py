"""Tolerances, and the short API to compare two models (the engine is ``engine.verify``).

The rule, elementwise over every element of every output::

    |folded - frozen| <= atol + rtol * |frozen|

plus identical NaN positions. Integer and bool outputs must match exactly.

Default tolerances, ``dtype name -> (atol, rtol)``:

- ``float32``: (1e-4, 1e-4). Folding replaces ``BN(conv(x, W) + b)`` by ``conv(x, W*k) + b'``: one
  multiply-add per layer is reordered, so each folded layer adds a few ulps (~1e-7 relative) and
  the error grows with depth, reaching about 1e-6..1e-5 on activations of order 1 after ~50 layers.
  1e-4 leaves an order of magnitude of headroom for that while still catching the mistakes folding
  actually makes: a single wrong channel (a scale applied to the wrong axis, a missing epsilon, a
  bias forgotten) changes that channel's outputs by the size of the BN shift, typically 1e-2..1.
- ``float16``: (1e-2, 1e-2). Half precision has an 11-bit mantissa (ulp ~1e-3 at 1.0); the folded
  weight is rounded once to fp16 where the unfolded path rounds the conv output and the BN output.
- ``bfloat16``: (5e-2, 5e-2). 8-bit mantissa (ulp ~8e-3 at 1.0); same reasoning as fp16. Other
  narrow float types (float8 variants) use these too.
- ``float64``: (1e-9, 1e-9). The reordering costs ~1e-16 per layer.

The relative error reported is ``max |a-b| / |ref|`` over the elements with ``|ref| >= atol`` (the
elements near zero are judged by ``atol`` alone and would make the ratio meaningless).
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import numpy as np

from bnfold.records import VerifyResult

__all__ = [
    "DEFAULT_TOLERANCES",
    "tolerance_for",
    "compare_outputs",
    "verify_models",
]

DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float32": (1e-4, 1e-4),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
    "float64": (1e-9, 1e-9),
}

_NARROW_FLOATS = ("bfloat16", "float8", "float4", "float6")


def tolerance_for(dtype: str) -> tuple[float, float]:
    """Default ``(atol, rtol)`` for a dtype name; ``(0, 0)`` (exact) for non-float types."""
    if dtype in DEFAULT_TOLERANCES:
        return DEFAULT_TOLERANCES[dtype]
    if dtype in ("double",):
        return DEFAULT_TOLERANCES["float64"]
    if dtype in ("float", "single"):
        return DEFAULT_TOLERANCES["float32"]
    if dtype == "half":
        return DEFAULT_TOLERANCES["float16"]
    if dtype.startswith(_NARROW_FLOATS):
        return DEFAULT_TOLERANCES["bfloat16"]
    return (0.0, 0.0)


def compare_outputs(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray],
                    dtypes: Mapping[str, str] | None = None,
                    atol: float | tuple[float | None, Mapping[str, float]] | None = None,
                    rtol: float | tuple[float | None, Mapping[str, float]] | None = None) -> list:
    """``OutputMetrics`` per reference output (in its order); a missing candidate output fails.

    ``atol``/``rtol``: one value for every output, or a :func:`parse_tolerances` result
    ``(global, {output: value})``; None: the output dtype's default.
    """
    from bnfold.verify.metrics import compute_metrics, tolerances_for

    atol_spec = atol if isinstance(atol, tuple) else (atol, {})
    rtol_spec = rtol if isinstance(rtol, tuple) else (rtol, {})
    results = []
    for name, ref in reference.items():
        dtype = (dtypes or {}).get(name) or str(np.asarray(ref).dtype)
        a, r = tolerances_for(name, dtype, atol_spec, rtol_spec)
        cand = candidate.get(name)
        if cand is None:
            cand = np.full(np.shape(ref)[:0] + (0,), np.nan)  # shape mismatch: fails with inf error
        results.append(compute_metrics(name, np.asarray(ref), np.asarray(cand), dtype=dtype, atol=a, rtol=r))
    return results


def verify_models(reference_path: str | os.PathLike, candidate_path: str | os.PathLike,
                  batches: Iterable[Mapping[str, np.ndarray]], *, provider: str = "cpu",
                  atol: float | None = None, rtol: float | None = None, localize: bool = True) -> VerifyResult:
    """Reference vs candidate on one provider with global tolerances (see ``engine.verify``)."""
    from bnfold.verify.engine import VerifyConfig, verify

    config = VerifyConfig(providers=(provider,), atol=(atol, {}), rtol=(rtol, {}), localize=localize)
    return verify(reference_path, candidate_path, list(batches), config)
