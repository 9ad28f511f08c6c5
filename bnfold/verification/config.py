"""How a verification runs: :class:`VerifyConfig`, the one settings record of ``engine.verify``.

A plain record (standard library only), so the CLI, the repro bundle and the API can build or read
one without importing the engine.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["VerifyConfig"]


@dataclass(frozen=True)
class VerifyConfig:
    """Providers, tolerances (:func:`bnfold.verification.tolerances.parse_tolerances` results), the
    error statistic, and where a failing run leaves its repro bundle."""

    providers: tuple[str, ...] = ("cpu",)
    atol: tuple[float | None, dict[str, float]] = (None, {})
    rtol: tuple[float | None, dict[str, float]] = (None, {})
    error_stat: str = "max"
    quantile: float = 0.99
    allow_missing_providers: bool = False
    tf32: bool = False
    localize: bool = True
    # Estimate the reference's float noise floor and let elements within NOISE_MARGIN x floor pass
    # too (``noise_floor``); False: the tolerance rule alone (``--no-noise-floor``, a strict check).
    noise_floor: bool = True
    # Where a failing run writes its repro bundle (``repro.write_bundle``). None (the default):
    # none. The library never picks a folder by itself; the CLI passes --repro-dir or its default
    # (``repro.default_location``: beside --report, else ./bnfold-repro) unless --no-repro.
    repro_dir: str | None = None
    repro_copy_models: bool = False  # copy (hard-link) both models into the bundle: their paths are temporary
    inputs: dict[str, Any] = field(default_factory=dict)  # how the feeds were made (for the report)
    # called as progress(done, total) after each model run on one batch (the CLI draws a bar on a terminal)
    progress: Callable[[int, int], None] | None = field(default=None, compare=False, repr=False)
