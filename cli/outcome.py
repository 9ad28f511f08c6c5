"""What a ``fold`` route hands to the command's closing steps (reports, summary, exit code)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover - bnfold.api imports onnx, which --help must not
    from bnfold.api import BnInspection
    from bnfold.run_records import Report


@dataclass(frozen=True)
class FoldOutcome:
    """``report``: the library's Report. ``plan_rows``: a dry run's rows (the plan table), else
    None. ``lines``: printed before the summary. ``ok``: False ends with exit 1, with ``failure``
    as the message (None: the ONNX verification's message, built from the report)."""

    report: Report
    ok: bool = True
    failure: str | None = None
    lines: tuple[str, ...] = ()
    plan_rows: list[BnInspection] | None = None
