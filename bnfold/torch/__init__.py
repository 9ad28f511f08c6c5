"""The PyTorch front end: calibrate and fold the BatchNorm modules of an ``nn.Module``.

``import bnfold`` never imports torch; this subpackage does::

    import bnfold.torch
    frozen, stats = bnfold.torch.calibrate(model, loader)        # Algorithm 2, model untouched
    bnfold.torch.drift(model, loader)["layer1.0.bn1"]           # running stats vs the data's
    result = bnfold.torch.fold(model, loader)                    # calibrate, then fold
    result.module, result.report.folded, result.report.bns

    # module -> calibrated, exported, folded, verified file (what `bnfold fold` does):
    done = bnfold.torch.convert(model, "calib.npz", "folded.onnx")
    done.passed, done.export_check, done.verification, done.output

Models that ``torch.fx`` cannot trace raise ``UnsupportedModelError`` in :func:`fold`;
:func:`convert` folds them through an ONNX export instead.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from bnfold.torch.calibrate import calibrate, drift

if TYPE_CHECKING:  # pragma: no cover
    from bnfold.torch.convert import ConvertResult, OutputCheck, TensorCheck, convert, resolve_device
    from bnfold.torch.fold import TorchFoldResult, fold
    from bnfold.torch.load import LoadedTorchModel, load_factory, load_model_file

# Imported on first use: bnfold.torch.convert and .fold pull in onnx (and with it ml_dtypes,
# measured 0.6 s to import here), which a one-shot ``calibrate`` must not pay (issue 16 point 4).
_LAZY = {
    "ConvertResult": "bnfold.torch.convert",
    "OutputCheck": "bnfold.torch.convert",
    "TensorCheck": "bnfold.torch.convert",
    "convert": "bnfold.torch.convert",
    "resolve_device": "bnfold.torch.convert",
    "TorchFoldResult": "bnfold.torch.fold",
    "fold": "bnfold.torch.fold",
    "LoadedTorchModel": "bnfold.torch.load",
    "load_factory": "bnfold.torch.load",
    "load_model_file": "bnfold.torch.load",
}

__all__ = [
    "ConvertResult",
    "LoadedTorchModel",
    "OutputCheck",
    "TensorCheck",
    "TorchFoldResult",
    "calibrate",
    "convert",
    "drift",
    "fold",
    "load_factory",
    "load_model_file",
    "resolve_device",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bnfold.torch' has no attribute '{name}'")


class _Package(types.ModuleType):
    """``bnfold.torch.fold`` and ``.convert`` stay the functions: loading the submodules of the
    same names (which sets them as attributes of this package) must not shadow them."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("fold", "convert") and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
