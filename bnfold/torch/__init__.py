"""The PyTorch front end: calibrate and fold the BatchNorm modules of an ``nn.Module``.

``import bnfold`` never imports torch; this subpackage does::

    import bnfold.torch
    frozen, stats = bnfold.torch.calibrate(model, loader)        # Algorithm 2, model untouched
    result = bnfold.torch.fold(model, loader)                    # calibrate, then fold
    result.module, result.report.folded, result.report.bns

Models that ``torch.fx`` cannot trace raise ``UnsupportedModelError``: export them to ONNX and
use :func:`bnfold.fold` on the file.
"""
from __future__ import annotations

from bnfold.torch.calibrate import calibrate
from bnfold.torch.fold import TorchFoldResult, fold

__all__ = ["TorchFoldResult", "calibrate", "fold"]
