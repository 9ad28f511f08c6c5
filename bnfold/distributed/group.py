"""Whether a run is distributed, and over which group (``distributed="auto"|True|False``).

``"auto"``: on when ``torch.distributed`` is importable, available and initialised with a world size
above 1; ``True``: the same, but an error when there is no such group; ``False``: one process.
The collectives run on a gloo group: the calibration exchanges a few float64 vectors per BN once per
run, on the host, so gloo serves a CPU and an NCCL run alike (a default NCCL group gets a gloo
companion group, made collectively on every rank).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from bnfold.errors import BadInputError

__all__ = ["DEFAULT_TIMEOUT_S", "TIMEOUT_ENV", "Group", "resolve_group", "timeout_seconds"]

#: environment variable with the collective timeout in seconds (``--dist-timeout`` sets it too)
TIMEOUT_ENV = "BNFOLD_DIST_TIMEOUT"
#: a rank that died, or stopped answering, fails the others after this long (seconds)
DEFAULT_TIMEOUT_S = 300.0


def timeout_seconds(given: float | None = None) -> float:
    """The collective timeout: ``given``, else $BNFOLD_DIST_TIMEOUT, else DEFAULT_TIMEOUT_S."""
    if given is not None:
        value: float = given
    else:
        raw = os.environ.get(TIMEOUT_ENV, "").strip()
        if not raw:
            return DEFAULT_TIMEOUT_S
        try:
            value = float(raw)
        except ValueError:
            raise BadInputError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds; set it to e.g. 300") from None
    if not value > 0:
        raise BadInputError(f"the distributed timeout must be a positive number of seconds, got {value:g}")
    return value


@dataclass(frozen=True)
class Group:
    """The calibration's process group: this process's rank, the world size, and the gloo group
    the collectives run on (None: torch's default group, already gloo)."""

    rank: int
    world_size: int
    handle: Any = None
    timeout_s: float = DEFAULT_TIMEOUT_S


#: the gloo companion of a non-gloo default group, and the default group it was made for
_COMPANION: dict[str, Any] = {}


def _initialised() -> Any:
    """``torch.distributed`` when it is available and initialised; else None. A process group exists
    only where ``torch.distributed`` was imported already: torch is never imported here for that."""
    if "torch.distributed" not in sys.modules:
        return None
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return None
    return dist


def resolve_group(distributed: bool | str = "auto") -> Group | None:
    """The :class:`Group` of this run, or None for a one-process run (see the module docstring)."""
    if distributed not in ("auto", True, False):
        raise BadInputError(f"distributed={distributed!r}: use 'auto', True or False")
    if distributed is False:
        return None
    dist = _initialised()
    if dist is None or dist.get_world_size() < 2:
        if distributed is True:
            raise BadInputError("distributed=True needs an initialised torch.distributed process group with more "
                                "than one process (torch.distributed.init_process_group, e.g. under torchrun)")
        return None
    timeout = timeout_seconds()
    handle = None
    if dist.get_backend() != "gloo":  # NCCL or another: a gloo companion for the host-side exchange
        world = dist.group.WORLD
        if _COMPANION.get("world") is not world:  # made once per default group (a collective call)
            _COMPANION.update(world=world, handle=dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout)))
        handle = _COMPANION["handle"]
    return Group(rank=dist.get_rank(), world_size=dist.get_world_size(), handle=handle, timeout_s=timeout)


def threads_per_rank() -> int:
    """The intra-op threads a rank's onnxruntime session gets: torch's own thread count for this
    process (``OMP_NUM_THREADS``, which torchrun sets to 1 per process unless told otherwise), so
    that N ranks on one machine do not each start a thread per core as onnxruntime's default does."""
    import torch

    return max(1, int(torch.get_num_threads()))
