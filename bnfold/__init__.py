"""bnfold: freeze, fold and verify BatchNorm in CNNs.

Public API::

    import bnfold
    result = bnfold.fold("model.onnx", output="folded.onnx", data="calib.npz", batch_size=32)
    result.report.folded, result.report.verification
    for row in bnfold.inspect("model.onnx"):
        print(row.name, row.mode, row.decision.action, row.decision.reason)
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bnfold.errors import BadInputError, BnfoldError, UnsupportedModelError, VerificationFailed
from bnfold.records import Action, Mode, Reason
from bnfold.version import __version__

__all__ = [
    "Action",
    "BadInputError",
    "BnfoldError",
    "Mode",
    "Reason",
    "UnsupportedModelError",
    "VerificationFailed",
    "fold",
    "inspect",
    "__version__",
]

if TYPE_CHECKING:  # pragma: no cover
    from bnfold.api import BnInspection, FoldResult, fold, inspect


def __getattr__(name: str) -> Any:
    # The pipeline pulls in onnx; keep ``import bnfold`` cheap for the CLI's --help.
    if name in ("fold", "inspect", "FoldResult", "BnInspection"):
        from bnfold import api as pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
