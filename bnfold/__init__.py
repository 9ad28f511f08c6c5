"""bnfold: freeze, fold and verify BatchNorm in CNNs.

The public API (other module paths are internal)::

    import bnfold
    result = bnfold.fold("model.onnx", output="folded.onnx", data="calib.npz", batch_size=32)
    result.ok, result.report.folded, result.report.verification
    for row in bnfold.inspect("model.onnx"):
        print(row.name, row.mode, row.decision.action, row.decision.reason)
    check = bnfold.verify("frozen.onnx", "folded.onnx", config=bnfold.VerifyConfig(providers=("cpu",)))
    bnfold.report.write_json(result.report, "report.json")

PyTorch modules: ``bnfold.torch`` (needs the ``torch`` extra).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from bnfold.errors import BadInputError, BnfoldError, ProviderUnavailable, UnsupportedModelError, VerificationFailed
from bnfold.formulas.stats import ESTIMATORS
from bnfold.records import Action, FrozenStats, Mode, Reason
from bnfold.version import __version__

if TYPE_CHECKING:  # pragma: no cover
    from bnfold import report
    from bnfold.api import BnInspection, FoldResult, fold, inspect, verify
    from bnfold.run_records import BnRecord, FoldDecision, OutputMetrics, ProviderRun, Report, SiteResult, VerifyResult
    from bnfold.verification.config import VerifyConfig

# The one place bnfold imports lazily: these names pull in onnx (and the pipeline), which
# ``import bnfold`` (and the CLI's --help) must not; the run's records are left out of
# ``import bnfold.torch`` (defining them is ~6 ms of a one-shot calibration). Each is imported on first use.
_LAZY = {
    "BnRecord": "bnfold.run_records",
    "FoldDecision": "bnfold.run_records",
    "OutputMetrics": "bnfold.run_records",
    "ProviderRun": "bnfold.run_records",
    "Report": "bnfold.run_records",
    "SiteResult": "bnfold.run_records",
    "VerifyResult": "bnfold.run_records",
    "fold": "bnfold.api",
    "inspect": "bnfold.api",
    "verify": "bnfold.api",
    "FoldResult": "bnfold.api",
    "model_files": "bnfold.api",
    "BnInspection": "bnfold.api",
    "VerifyConfig": "bnfold.verification.config",
}

__all__ = [
    "Action",
    "BadInputError",
    "BnInspection",
    "BnRecord",
    "BnfoldError",
    "ESTIMATORS",
    "FoldDecision",
    "FoldResult",
    "FrozenStats",
    "Mode",
    "OutputMetrics",
    "ProviderRun",
    "ProviderUnavailable",
    "Reason",
    "Report",
    "SiteResult",
    "UnsupportedModelError",
    "VerificationFailed",
    "VerifyConfig",
    "VerifyResult",
    "__version__",
    "fold",
    "inspect",
    "model_files",
    "report",
    "verify",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name == "report":
        return importlib.import_module("bnfold.report")
    raise AttributeError(f"module 'bnfold' has no attribute '{name}'")
