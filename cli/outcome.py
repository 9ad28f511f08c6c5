"""What a ``fold`` route hands to the command's closing steps (reports, summary, exit code)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FoldOutcome:
    """``report``: the library's Report. ``plan_rows``: a dry run's BnInspection rows (the plan
    table), else None. ``lines``: printed before the summary. ``ok``: False ends with exit 1, with
    ``failure`` as the message (None: the ONNX verification's message is built from the report)."""

    report: Any
    ok: bool = True
    failure: str | None = None
    lines: tuple[str, ...] = ()
    plan_rows: list[Any] | None = None
