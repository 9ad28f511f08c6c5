"""The facts every verification renderer shows, taken from a :class:`VerifyResult` once.

The terminal summary, JUnit XML, Markdown, HTML and JSON renderers format these and compute
nothing themselves: which providers ran, the output names compared, the noise floor per output,
the fold sites out of tolerance and the first divergent one, the sites worst first, and the
settings / inputs in the documented layout (``docs/report-schema.md``).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from bnfold.environment import collect_environment
from bnfold.json_values import json_safe
from bnfold.run_records import ProviderRun, SiteResult, VerifyResult

__all__ = [
    "INPUTS_KEYS",
    "SETTINGS_KEYS",
    "VerifyFacts",
    "find_site",
    "inputs_to_dict",
    "magnitude",
    "noise_floors",
    "settings_to_dict",
    "verify_facts",
    "worst_sites",
]

#: keys always present in ``verification.settings`` (null when the record does not give them)
SETTINGS_KEYS = (
    "graph_optimization_level",
    "tf32",
    "deterministic",
    "cudnn_conv_algo_search",
    "error_stat",
    "quantile",
    "tolerances",
)
#: keys always present in ``verification.inputs`` (null when the record does not give them)
INPUTS_KEYS = ("source", "seed", "val_range", "iterations", "data", "batch_size", "sha256")

# other spellings verifiers use for the documented keys: (documented key, alias)
_SETTINGS_ALIASES = (("deterministic", "deterministic_compute"),)
_INPUTS_ALIASES = (("data", "path"),)


def settings_to_dict(result: VerifyResult) -> dict[str, Any]:
    """``result.settings`` in the documented layout (see ``docs/report-schema.md``)."""
    given = dict(result.settings)
    for key, alias in _SETTINGS_ALIASES:
        if key not in given and alias in given:
            given[key] = given.pop(alias)
    cuda = given.get("cuda")
    if "cudnn_conv_algo_search" not in given and isinstance(cuda, Mapping):
        given["cudnn_conv_algo_search"] = cuda.get("cudnn_conv_algo_search")
    if "tolerances" not in given and ("atol" in given or "rtol" in given):
        given["tolerances"] = {"atol": given.pop("atol", None), "rtol": given.pop("rtol", None)}
    first = result.outputs[0] if result.outputs else None
    # what the metrics themselves say, when the record's settings do not
    derived: dict[str, Any] = {}
    if first is not None:
        derived["error_stat"] = first.error_stat
        derived["quantile"] = first.quantile
        derived["tolerances"] = {
            "per_output": {o.name: {"atol": o.atol, "rtol": o.rtol} for o in result.outputs}
        }
    out = {key: given.pop(key, derived.get(key)) for key in SETTINGS_KEYS}
    out.update(given)
    safe: dict[str, Any] = json_safe(out)
    return safe


def inputs_to_dict(result: VerifyResult) -> dict[str, Any]:
    """``result.inputs`` in the documented layout (see ``docs/report-schema.md``)."""
    given = dict(result.inputs)
    for key, alias in _INPUTS_ALIASES:
        if key not in given and alias in given:
            given[key] = given.pop(alias)
    out = {key: given.pop(key, None) for key in INPUTS_KEYS}
    if out["sha256"] is None:
        out["sha256"] = {}
    out.update(given)
    safe: dict[str, Any] = json_safe(out)
    return safe


def magnitude(x: Any) -> float:
    """An error magnitude for sorting: NaN counts as worse than anything (inf)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return math.inf
    return math.inf if math.isnan(v) else v


def worst_sites(sites: Iterable[SiteResult], n: int | None = None) -> list[SiteResult]:
    """Fold sites worst first: failing before passing, then by max abs error (NaN as inf), then by
    position along the network."""
    ordered = sorted(sites, key=lambda s: (bool(s.passed), -magnitude(s.max_abs), s.position))
    return ordered if n is None else ordered[:n]


def find_site(result: VerifyResult, name: str | None) -> SiteResult | None:
    """The site named ``name`` (BN name, else compared tensor), or None."""
    if not name:
        return None
    for s in result.sites:
        if s.bn == name:
            return s
    for s in result.sites:
        if s.tensor == name:
            return s
    return None


def noise_floors(run: ProviderRun) -> dict[str, float]:
    """``{output: max |reference on this provider - reference on the first|}`` (empty when only
    one provider ran)."""
    return {name: value for name, value in run.noise_floor}


@dataclass(frozen=True)
class VerifyFacts:
    """What the renderers show about one verification, computed once by :func:`verify_facts`."""

    result: VerifyResult
    providers: tuple[str, ...]  # every requested provider, ran or skipped, in order
    output_names: tuple[str, ...]  # outputs compared by the providers that ran, in order, no repeats
    noise: tuple[dict[str, float], ...]  # per run (in ``result.runs`` order): noise floor per output
    failing_sites: tuple[SiteResult, ...]  # fold sites out of tolerance, in ``result.sites`` order
    sites_by_position: tuple[SiteResult, ...]  # every fold site along the network
    first_site: SiteResult | None  # the first divergent site, else the first failing one by position
    settings: dict[str, Any]  # settings_to_dict
    inputs: dict[str, Any]  # inputs_to_dict

    @property
    def passed(self) -> bool:
        return self.result.passed

    @property
    def verdict(self) -> str:
        """``"PASSED"`` or ``"FAILED"``."""
        return "PASSED" if self.result.passed else "FAILED"

    def environment(self) -> dict[str, Any]:
        """The environment the reports show (``collect_environment``; read when asked: it looks
        at the platform and the imported onnxruntime / torch)."""
        return collect_environment(self.result.environment)


def verify_facts(result: VerifyResult) -> VerifyFacts:
    """The facts of ``result`` (see :class:`VerifyFacts`)."""
    failing = tuple(s for s in result.sites if not s.passed)
    first = find_site(result, result.first_divergent_site)
    if first is None and failing:
        first = min(failing, key=lambda s: s.position)
    return VerifyFacts(
        result=result,
        providers=tuple(r.provider for r in result.runs),
        output_names=tuple(dict.fromkeys(o.name for r in result.ran for o in r.outputs)),
        noise=tuple(noise_floors(r) for r in result.runs),
        failing_sites=failing,
        sites_by_position=tuple(sorted(result.sites, key=lambda s: s.position)),
        first_site=first,
        settings=settings_to_dict(result),
        inputs=inputs_to_dict(result),
    )
