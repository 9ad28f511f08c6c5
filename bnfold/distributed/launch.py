"""The CLI's process group, from the standard torchrun environment.

When WORLD_SIZE > 1 (with RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, as torchrun and other
launchers set them), the CLI initialises a gloo process group itself, with the collective timeout of
``--dist-timeout`` / $BNFOLD_DIST_TIMEOUT, and destroys it at the end. gloo for both routes: the
collectives carry a few float64 vectors per BN once per run, on the host; NCCL would only add a
device copy (the torch route still calibrates on its CUDA device).
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta

from bnfold.distributed.combine import RankFailed
from bnfold.distributed.group import Group, timeout_seconds
from bnfold.errors import BadInputError, one_line

__all__ = ["ENV_NAMES", "group_from_environment", "launched"]

ENV_NAMES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched(env: Mapping[str, str] | None = None) -> bool:
    """Whether a launcher asks for a distributed run (WORLD_SIZE > 1)."""
    env = os.environ if env is None else env
    try:
        return int(env.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        raise BadInputError(f"WORLD_SIZE={env.get('WORLD_SIZE')!r} is not a number; launch with torchrun "
                            "(it sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)") from None


@contextmanager
def group_from_environment(timeout_s: float | None = None) -> Iterator[Group | None]:
    """The run's :class:`Group` (None outside a launcher), its process group destroyed on exit."""
    if not launched():
        yield None
        return
    missing = [n for n in ENV_NAMES if not os.environ.get(n)]
    if missing:
        raise BadInputError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} asks for a distributed run but "
                            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set; launch with "
                            "torchrun (or set all of " + ", ".join(ENV_NAMES) + ")")
    timeout = timeout_seconds(timeout_s)
    try:
        import torch.distributed as dist
    except ImportError:
        raise BadInputError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} asks for a distributed run, which needs "
                            "torch (pip install 'bnfold[torch]'); or run bnfold without torchrun") from None
    made = not dist.is_initialized()
    if made:
        try:
            dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=timeout))
        except Exception as exc:  # noqa: BLE001 - torch's DistNetworkError, RuntimeError, ValueError
            raise RankFailed(
                f"cannot join the process group at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} "
                f"({one_line(exc, 160)}); check MASTER_ADDR/MASTER_PORT (torchrun --rdzv-endpoint) and that every "
                "rank was started", broken=True) from exc
    try:
        yield Group(rank=dist.get_rank(), world_size=dist.get_world_size(), timeout_s=timeout)
    finally:
        if made and dist.is_initialized():
            dist.destroy_process_group()
