"""Whether a torch device can be used here: one check, shared by calibration and fold."""
from __future__ import annotations

import torch

from bnfold.errors import BadInputError, ProviderUnavailable, one_line

__all__ = ["check_device"]


def check_device(device: str | torch.device | None) -> None:
    """BadInputError where ``device`` names no torch device; ProviderUnavailable (one line) where
    this torch cannot put a tensor on it (torch's own error is a bare AssertionError for CUDA)."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise BadInputError(f"device={device!r} is not a torch device: {one_line(exc, 200)}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        why = "torch was built without CUDA" if torch.version.cuda is None else "torch sees no CUDA device"
        raise ProviderUnavailable(f"device={str(device)!r} was requested but CUDA is not available ({why}, torch "
                                  f"{torch.__version__}); use device='cpu'")
    try:
        torch.empty(0, device=dev)
    except Exception as exc:  # noqa: BLE001 - AssertionError, RuntimeError, ...: torch's kinds vary by backend
        raise ProviderUnavailable(f"device={str(device)!r} cannot be used here: {type(exc).__name__}: "
                                  f"{one_line(exc, 200)}; use device='cpu'") from None
