"""Compare the folded model with the frozen (unfolded) model on the same inputs.

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
from typing import TYPE_CHECKING

import numpy as np

from ..errors import BadInputError, UnsupportedModelError, VerificationFailed
from ..records import OutputError, VerifyResult
from .session import PROVIDERS, _provider_name, make_session

if TYPE_CHECKING:  # pragma: no cover
    import onnxruntime

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

# onnxruntime NodeArg.type strings -> dtype names
_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(bfloat16)": "bfloat16",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
    "tensor(string)": "string",
}


def _is_float_name(name: str) -> bool:
    return name.startswith(("float", "bfloat")) or name in ("double", "half")


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


def _as_float64(array: np.ndarray, dtype_name: str) -> np.ndarray:
    """Values as float64; bfloat16 delivered as raw uint16 bits is decoded."""
    if dtype_name == "bfloat16" and array.dtype == np.uint16:
        return (array.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return np.asarray(array).astype(np.float64)


def _compare_one(
    name: str, ref: np.ndarray, cand: np.ndarray, dtype_name: str, atol: float, rtol: float
) -> OutputError:
    inf = float("inf")
    ref = np.asarray(ref)
    cand = np.asarray(cand)
    if ref.shape != cand.shape:
        return OutputError(name, dtype_name, inf, inf, atol, rtol, False)

    if not _is_float_name(dtype_name):
        # exact: int, bool, string
        if ref.dtype.kind in "OUS" or cand.dtype.kind in "OUS":
            equal = bool(np.array_equal(ref, cand))
            return OutputError(name, dtype_name, 0.0 if equal else inf, 0.0 if equal else inf,
                               0.0, 0.0, equal and ref.dtype == cand.dtype)
        diff = np.abs(ref.astype(np.float64) - cand.astype(np.float64))
        max_abs = float(diff.max(initial=0.0))
        denom = np.abs(ref.astype(np.float64))
        nz = denom > 0
        max_rel = float((diff[nz] / denom[nz]).max(initial=0.0))
        passed = bool(np.array_equal(ref, cand)) and ref.dtype == cand.dtype
        return OutputError(name, dtype_name, max_abs, max_rel, 0.0, 0.0, passed)

    a = _as_float64(ref, dtype_name)
    b = _as_float64(cand, dtype_name)
    nan_a = np.isnan(a)
    nan_b = np.isnan(b)
    nan_ok = bool(np.array_equal(nan_a, nan_b))
    both = ~(nan_a | nan_b)
    a = a[both]
    b = b[both]
    with np.errstate(invalid="ignore", over="ignore"):
        # equal values (including equal infinities) count as zero error
        diff = np.where(a == b, 0.0, np.abs(a - b))
        mag = np.abs(a)
        # an infinite bound would accept anything: non-finite values must match exactly
        finite = np.isfinite(a) & np.isfinite(b)
        within = np.where(finite, diff <= atol + rtol * mag, a == b)
        guard = max(atol, np.finfo(np.float64).tiny)
        rel_mask = mag >= guard
        rel = diff[rel_mask] / mag[rel_mask]
    max_abs = float(diff.max(initial=0.0))
    max_rel = float(np.nanmax(rel, initial=0.0)) if rel.size else 0.0
    passed = nan_ok and bool(within.all())
    return OutputError(name, dtype_name, max_abs, max_rel, float(atol), float(rtol), passed)


def compare_outputs(
    reference: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    dtypes: Mapping[str, str],
    atol: float | None = None,
    rtol: float | None = None,
) -> list[OutputError]:
    """One :class:`OutputError` per reference output, in the reference's order.

    ``dtypes`` maps output name to dtype name (``'float32'``...; the reference array's dtype when
    absent). ``atol``/``rtol`` override the per-dtype defaults for float outputs; non-float outputs
    are always compared exactly. An output missing from ``candidate`` or of a different shape
    fails with infinite errors.
    """
    results = []
    for name, ref in reference.items():
        ref = np.asarray(ref)
        dtype_name = dtypes.get(name) or ref.dtype.name
        if _is_float_name(dtype_name):
            d_atol, d_rtol = tolerance_for(dtype_name)
            o_atol = d_atol if atol is None else float(atol)
            o_rtol = d_rtol if rtol is None else float(rtol)
        else:
            o_atol, o_rtol = 0.0, 0.0
        if name not in candidate:
            results.append(OutputError(name, dtype_name, float("inf"), float("inf"), o_atol, o_rtol, False))
            continue
        results.append(_compare_one(name, ref, np.asarray(candidate[name]), dtype_name, o_atol, o_rtol))
    return results


def _merge(a: OutputError, b: OutputError) -> OutputError:
    return OutputError(
        name=a.name,
        dtype=a.dtype,
        max_abs=max(a.max_abs, b.max_abs),
        max_rel=max(a.max_rel, b.max_rel),
        atol=a.atol,
        rtol=a.rtol,
        passed=a.passed and b.passed,
    )


def _output_dtypes(session: "onnxruntime.InferenceSession", which: str) -> dict[str, str]:
    dtypes = {}
    for out in session.get_outputs():
        t = out.type
        if not t.startswith("tensor("):
            raise UnsupportedModelError(
                f"{which} model output {out.name!r} is of type {t}; bnfold verifies tensor outputs only"
            )
        dtypes[out.name] = _ORT_TYPES.get(t, t[len("tensor("):-1])
    return dtypes


def _batch_samples(feed: Mapping[str, np.ndarray]) -> int:
    for value in feed.values():
        arr = np.asarray(value)
        if arr.ndim >= 1:
            return int(arr.shape[0])
    return 1


def _short_provider(provider: str) -> str:
    full = _provider_name(provider)
    return next((k for k, v in PROVIDERS.items() if v == full), provider)


def verify_models(
    reference_path: str | os.PathLike,
    candidate_path: str | os.PathLike,
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    provider: str = "cpu",
    atol: float | None = None,
    rtol: float | None = None,
) -> VerifyResult:
    """Run the frozen, unfolded ``reference`` and the folded ``candidate`` on every batch.

    Both sessions run with graph optimisations off (see :func:`make_session`). Batches are
    compared one at a time and the per-output figures merged (max of errors, all of verdicts):
    the same result as comparing the concatenated outputs, with memory bounded by one batch.
    ``samples`` counts the leading dimension of the fed inputs. Raises
    :class:`UnsupportedModelError` when the two models' input or output names differ,
    :class:`BadInputError` when a batch lacks an input or the reference cannot run on it, and
    :class:`VerificationFailed` when the candidate cannot run where the reference did. A numerical
    mismatch is not an exception: it is ``VerifyResult.passed == False``.
    """
    ref_sess = make_session(reference_path, provider=provider, optimize=False)
    cand_sess = make_session(candidate_path, provider=provider, optimize=False)

    ref_dtypes = _output_dtypes(ref_sess, "reference")
    cand_dtypes = _output_dtypes(cand_sess, "folded")
    if set(ref_dtypes) != set(cand_dtypes):
        only_ref = sorted(set(ref_dtypes) - set(cand_dtypes))
        only_cand = sorted(set(cand_dtypes) - set(ref_dtypes))
        raise UnsupportedModelError(
            "the folded and reference models have different outputs "
            f"(only in reference: {only_ref or '-'}; only in folded: {only_cand or '-'})"
        )
    ref_inputs = [i.name for i in ref_sess.get_inputs()]
    cand_inputs = {i.name for i in cand_sess.get_inputs()}
    if set(ref_inputs) != cand_inputs:
        raise UnsupportedModelError(
            "the folded and reference models have different inputs "
            f"(reference: {sorted(ref_inputs)}; folded: {sorted(cand_inputs)})"
        )

    output_names = list(ref_dtypes)
    merged: dict[str, OutputError] = {}
    samples = 0
    n_batches = 0
    for batch in batches:
        missing = [n for n in ref_inputs if n not in batch]
        if missing:
            raise BadInputError(
                f"verification batch {n_batches} lacks model input(s) {', '.join(missing)}"
            )
        feed = {n: np.asarray(batch[n]) for n in ref_inputs}
        try:
            ref_out = ref_sess.run(output_names, feed)
        except Exception as exc:
            raise BadInputError(
                f"onnxruntime cannot run the reference model on verification batch {n_batches}: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
            ) from None
        try:
            cand_out = cand_sess.run(output_names, feed)
        except Exception as exc:
            raise VerificationFailed(
                f"the folded model fails to run on verification batch {n_batches} where the "
                f"reference runs: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
            ) from None
        errors = compare_outputs(
            dict(zip(output_names, ref_out)),
            dict(zip(output_names, cand_out)),
            ref_dtypes,
            atol=atol,
            rtol=rtol,
        )
        for err in errors:
            merged[err.name] = _merge(merged[err.name], err) if err.name in merged else err
        samples += _batch_samples(feed)
        n_batches += 1

    if n_batches == 0:
        raise BadInputError("no verification samples: give at least one input batch")

    outputs = tuple(merged[n] for n in output_names)
    return VerifyResult(
        passed=all(o.passed for o in outputs),
        provider=_short_provider(provider),
        samples=samples,
        outputs=outputs,
    )
