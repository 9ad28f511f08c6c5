"""The file formats bnfold writes for a PyTorch model, picked by the output's suffix.

Kept apart from :mod:`bnfold.torch` (and free of torch) so that the CLI can check an output
path before it imports torch; :func:`bnfold.torch.convert` reads the same table.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["FORMAT_LABELS", "TORCH_OUTPUT_FORMATS", "torch_output_format"]

#: output suffix (lower case) -> format written: 'onnx' (ONNX export, then the ONNX fold),
#: 'pt2' (torch.export), 'torchscript' (torch.jit.trace)
TORCH_OUTPUT_FORMATS: dict[str, str] = {".onnx": "onnx", ".pt2": "pt2", ".pt": "torchscript", ".ts": "torchscript",
                                        ".torchscript": "torchscript"}

#: format -> how messages name it
FORMAT_LABELS: dict[str, str] = {"onnx": "ONNX", "pt2": "ExportedProgram", "torchscript": "TorchScript"}


def torch_output_format(path: Path) -> str | None:
    """``'onnx'``, ``'pt2'``, ``'torchscript'`` from ``path``'s suffix; None for any other suffix."""
    return TORCH_OUTPUT_FORMATS.get(path.suffix.lower())
