"""verification/tolerances.py: the CLI spelling written back (format_tolerances) and the dtype defaults."""
from __future__ import annotations

import pytest

from bnfold.verification.tolerances import (
    DEFAULT_TOLERANCES,
    ToleranceSpec,
    dtype_tolerance,
    format_tolerances,
    parse_tolerances,
    resolve_tolerances,
)


@pytest.mark.parametrize(("spec", "text"), [
    ((1e-4, {}), "0.0001"),
    ((None, {"logits": 1e-3}), "logits:0.001"),
    ((0.1, {"a:b": 2.5e-7, "c": float("inf")}), "0.1,a:b:2.5e-07,c:inf"),
    ((None, {}), None),
])
def test_format_tolerances_is_what_parse_tolerances_reads_back(spec: ToleranceSpec, text: str | None) -> None:
    assert format_tolerances(spec) == text
    assert parse_tolerances(text, None) == (spec[0], dict(spec[1]))


def test_dtype_aliases_share_the_defaults() -> None:
    assert dtype_tolerance("double") == DEFAULT_TOLERANCES["float64"]
    assert dtype_tolerance("float") == dtype_tolerance("single") == DEFAULT_TOLERANCES["float32"]
    assert dtype_tolerance("half") == DEFAULT_TOLERANCES["float16"]
    assert dtype_tolerance("float8e4m3fn") == DEFAULT_TOLERANCES["bfloat16"]
    assert resolve_tolerances("y", "double", None, (None, {"y": 0.5})) == (1e-9, 0.5)
