"""The per-run facts a calibration report shows, combined over the ranks (the statistics themselves
merge in :mod:`bnfold.distributed.combine`): batches and samples add, each BN's first-seen order and
input dtype come from the lowest rank that saw it, calls per forward take the maximum, warnings are
the ordered union."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["RankFacts", "combine_facts"]


@dataclass
class RankFacts:
    """What one rank's calibration pass saw besides the statistics (plain types: sent as JSON, ``wire``)."""

    batches: int = 0
    samples: int | None = 0  # None where a batch has no leading dimension
    first_call: list[str] = field(default_factory=list)  # BNs in the order of their first call
    in_dtype: dict[str, str] = field(default_factory=dict)  # BN -> its input's torch dtype name
    max_calls: dict[str, int] = field(default_factory=dict)
    ranks: dict[str, list[int]] = field(default_factory=dict)  # BN -> input ranks in the first forward
    warnings: list[str] = field(default_factory=list)


def _union(lists: Sequence[Sequence[str]]) -> list[str]:
    seen: dict[str, None] = {}
    for items in lists:
        for item in items:
            seen.setdefault(item, None)
    return list(seen)


def combine_facts(per_rank: Sequence[RankFacts]) -> RankFacts:
    """The facts of all ranks together (``per_rank`` in rank order)."""
    samples: int | None = 0
    for f in per_rank:
        samples = None if samples is None or f.samples is None else samples + f.samples
    in_dtype: dict[str, str] = {}
    ranks: dict[str, list[int]] = {}
    max_calls: dict[str, int] = {}
    for f in per_rank:
        for name, dtype in f.in_dtype.items():
            in_dtype.setdefault(name, dtype)
        for name, dims in f.ranks.items():
            ranks[name] = sorted(set(ranks.get(name, [])) | set(dims))
        for name, n in f.max_calls.items():
            max_calls[name] = max(max_calls.get(name, 0), n)
    return RankFacts(batches=sum(f.batches for f in per_rank), samples=samples,
                     first_call=_union([f.first_call for f in per_rank]), in_dtype=in_dtype, max_calls=max_calls,
                     ranks=ranks, warnings=_union([f.warnings for f in per_rank]))
