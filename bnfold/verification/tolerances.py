"""Verification tolerances: the dtype defaults, the precedence rule, the CLI spelling.

The rule, elementwise over every element of every output::

    |folded - frozen| <= atol + rtol * |frozen|

plus identical NaN positions. Integer, bool and string outputs must match exactly: their
tolerances are ignored and recorded as 0.

Default tolerances (:data:`DEFAULT_TOLERANCES`, ``dtype name -> (atol, rtol)``):

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

Precedence (:func:`resolve_tolerances`): a per-output value (``--atol logits:1e-3``) beats a global
value (``--atol 1e-4``), which beats the dtype default (:func:`dtype_tolerance`). atol and rtol are
resolved independently. :func:`parse_tolerances` reads the CLI spelling into a
:data:`ToleranceSpec` (:func:`format_tolerances` writes it back);
:func:`check_tolerance_names` refuses a per-output value for an output the model lacks.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from bnfold.errors import BadInputError

__all__ = [
    "DEFAULT_TOLERANCES",
    "ToleranceSpec",
    "check_tolerance_names",
    "dtype_tolerance",
    "format_tolerances",
    "is_float_dtype",
    "normalize_dtype",
    "parse_tolerances",
    "resolve_tolerances",
]

#: ``(global value or None, {output name: value})``, as :func:`parse_tolerances` returns it
ToleranceSpec = tuple[float | None, Mapping[str, float]]

DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float32": (1e-4, 1e-4),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
    "float64": (1e-9, 1e-9),
}

_NARROW_FLOATS = ("bfloat16", "float8", "float4", "float6")

_ALIASES = {"float": "float32", "single": "float32", "double": "float64", "half": "float16"}


def normalize_dtype(name: str) -> str:
    """The numpy spelling of a dtype name (``'float'`` -> ``'float32'``, ``'double'`` -> ``'float64'``)."""
    return _ALIASES.get(name, name)


def is_float_dtype(name: str) -> bool:
    """Whether a (normalised) dtype name is a floating type, compared within tolerances."""
    return name.startswith(("float", "bfloat"))


def dtype_tolerance(dtype: str) -> tuple[float, float]:
    """Default ``(atol, rtol)`` for a dtype name; ``(0, 0)`` (exact) for non-float types."""
    if dtype in DEFAULT_TOLERANCES:
        return DEFAULT_TOLERANCES[dtype]
    if dtype in ("double", "complex128"):  # a complex output: its parts' tolerance
        return DEFAULT_TOLERANCES["float64"]
    if dtype == "complex64":
        return DEFAULT_TOLERANCES["float32"]
    if dtype in ("float", "single"):
        return DEFAULT_TOLERANCES["float32"]
    if dtype == "half":
        return DEFAULT_TOLERANCES["float16"]
    if dtype.startswith(_NARROW_FLOATS):
        return DEFAULT_TOLERANCES["bfloat16"]
    return (0.0, 0.0)


def _tolerance_error(token: str, spec: str, reason: str) -> BadInputError:
    return BadInputError(
        f"bad tolerance {token!r} in {spec!r}: {reason}; accepted forms: 'X' (all outputs), "
        "'NAME:X' (one output; NAME may contain ':', the last one separates), "
        "comma-separated (e.g. '1e-4,logits:1e-3')"
    )


def _parse_value(text: str, token: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _tolerance_error(token, spec, f"{text.strip()!r} is not a number") from None
    if math.isnan(value):
        raise _tolerance_error(token, spec, "NaN is not a tolerance")
    if value < 0:
        raise _tolerance_error(token, spec, "tolerances must be >= 0")
    return value


def parse_tolerances(spec: str | None, default: float | None) -> tuple[float | None, dict[str, float]]:
    """Parse a CLI tolerance: ``'1e-4'`` (global), ``'logits:1e-3,probs:1e-2'`` (per output), or mixed.

    Returns ``(global value or default, {output name: value})``. ``spec=None`` gives
    ``(default, {})``. Output names may contain ``':'`` (the last ``':'`` separates the value) but
    not ``','``. Raises :class:`BadInputError` (one line, naming the bad token and the accepted forms)
    on an empty token, a non-number, NaN, a negative value, a global value given twice or an output
    named twice. ``inf`` is accepted (it disables that check).
    """
    if spec is None:
        return default, {}
    global_value: float | None = None
    per_output: dict[str, float] = {}
    for raw in spec.split(","):
        token = raw.strip()
        if not token:
            raise _tolerance_error(raw, spec, "empty entry")
        if ":" in token:
            out, _, text = token.rpartition(":")
            out = out.strip()
            if not out:
                raise _tolerance_error(token, spec, "missing output name before ':'")
            if not text.strip():
                raise _tolerance_error(token, spec, f"missing value after {out!r}:")
            value = _parse_value(text, token, spec)
            if out in per_output:
                raise _tolerance_error(token, spec, f"output {out!r} given twice")
            per_output[out] = value
        else:
            value = _parse_value(token, token, spec)
            if global_value is not None:
                raise _tolerance_error(token, spec, "global value given twice")
            global_value = value
    return (default if global_value is None else global_value), per_output


def format_tolerances(spec: ToleranceSpec) -> str | None:
    """The CLI spelling of a :data:`ToleranceSpec` (what :func:`parse_tolerances` reads back to the
    same values), or None when it gives no value."""
    value, per_output = spec
    parts = [] if value is None else [repr(float(value))]
    parts += [f"{name}:{float(v)!r}" for name, v in per_output.items()]
    return ",".join(parts) or None


def resolve_tolerances(
    output: str,
    dtype: str,
    atol_spec: ToleranceSpec | None,
    rtol_spec: ToleranceSpec | None,
) -> tuple[float, float]:
    """``(atol, rtol)`` for one output: per-output override > global > dtype default.

    The specs are :func:`parse_tolerances` results (``None`` means nothing given). atol and rtol are
    resolved independently. Non-float dtypes always get ``(0.0, 0.0)``: they are compared exactly.
    """
    dtype_name = normalize_dtype(dtype)
    if not (is_float_dtype(dtype_name) or dtype_name.startswith("complex")):  # complex: its parts, within tolerance
        return 0.0, 0.0
    d_atol, d_rtol = dtype_tolerance(dtype_name)

    def pick(spec: ToleranceSpec | None, fallback: float) -> float:
        if spec is None:
            return float(fallback)
        global_value, per_output = spec
        if output in per_output:
            return float(per_output[output])
        if global_value is not None:
            return float(global_value)
        return float(fallback)

    return pick(atol_spec, d_atol), pick(rtol_spec, d_rtol)


def check_tolerance_names(
    outputs: Sequence[str],
    atol_spec: ToleranceSpec | None,
    rtol_spec: ToleranceSpec | None,
) -> None:
    """Raise :class:`BadInputError` when a per-output tolerance names an output the model lacks."""
    known = set(outputs)
    for option, spec in (("atol", atol_spec), ("rtol", rtol_spec)):
        if spec is None:
            continue
        unknown = [n for n in spec[1] if n not in known]
        if unknown:
            raise BadInputError(
                f"{option} names output(s) {', '.join(repr(n) for n in unknown)} that the model "
                f"does not have; its outputs are {', '.join(repr(n) for n in outputs) or '(none)'}"
            )
