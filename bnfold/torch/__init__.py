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

from bnfold.torch.calibrate import calibrate, drift
from bnfold.torch.convert import ConvertResult, OutputCheck, TensorCheck, convert, resolve_device
from bnfold.torch.fold import TorchFoldResult, fold
from bnfold.torch.load import LoadedTorchModel, load_factory, load_model_file

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
