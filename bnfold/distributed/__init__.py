"""Calibration across the processes of a ``torch.distributed`` group (issue 17 point 1).

* :mod:`.group`: is a run distributed (``distributed="auto"|True|False``), and the group's rank and size;
* :mod:`.launch`: the CLI's process group from the torchrun environment (gloo, a timeout, destroyed at the end);
* :mod:`.shard`: batch j of the single-process sequence goes to rank j mod N;
* :mod:`.combine`: every rank's per-BN ``BnStats`` all-gathered and merged in rank order (bitwise the
  same on every rank), a rank's error sent to the others, rank 0's outcome shared.

torch is imported lazily (an ONNX-only install imports this package without it).
"""
from __future__ import annotations

from bnfold.distributed.combine import RankFailed, gather_calibration, share_outcome
from bnfold.distributed.group import TIMEOUT_ENV, Group, resolve_group, threads_per_rank
from bnfold.distributed.launch import group_from_environment, launched
from bnfold.distributed.shard import RankShard

__all__ = ["TIMEOUT_ENV", "Group", "RankFailed", "RankShard", "gather_calibration", "group_from_environment",
           "launched", "resolve_group", "share_outcome", "threads_per_rank"]
